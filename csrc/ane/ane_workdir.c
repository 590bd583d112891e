/* ane_workdir.c — the compiler's working directory of one program.
 *
 * The ANE compiler works in <temp dir>/<the model's hexStringIdentifier>/
 * (model.mil, weights/, and its own output). That identifier is derived from
 * the program, so two contexts or two processes (DDP workers) compiling the
 * same program would share one directory and delete it under each other.
 * Two defences: the core puts a per-process, per-context tag into every
 * program's text (ane_mil.c), so the identifiers should differ (assumed:
 * not yet confirmed on a Mac); and, whatever the identifier, a directory is
 * removed at unload only by the program that created it (mkdir succeeded),
 * never by one that found it already there.
 *
 * Plain POSIX, so the emulated platform uses the same code (with a hash of
 * the MIL text as the name) and the tests exercise it on Linux. */
#include <errno.h>
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "ane_internal.h"

static int write_file_atomic(const char *path, const char *data, size_t len) {
    char tmp[AB_ANE_PATH + 32];
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    size_t n = fwrite(data, 1, len, f);
    if (fclose(f) != 0 || n != len || rename(tmp, path) != 0) {
        remove(tmp);
        return -1;
    }
    return 0;
}

int ab_ane_workdir_create(const char *root, const char *name, const char *mil, size_t mil_len,
                          char *dir, size_t dircap, int *owned, char *err, size_t errcap) {
    *owned = 0;
    size_t rl = strlen(root);
    int n = snprintf(dir, dircap, "%s%s%s", root, rl && root[rl - 1] == '/' ? "" : "/", name);
    if (n < 0 || (size_t)n >= dircap || (size_t)n + 32 > AB_ANE_PATH)
        return ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "the working directory path is too long: %s/%s",
                           root, name);
    if (mkdir(dir, 0700) == 0) *owned = 1;
    else if (errno != EEXIST)
        return ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "cannot create %s: %s", dir, strerror(errno));
    char path[AB_ANE_PATH];
    snprintf(path, sizeof path, "%s/weights", dir);
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        int e = errno;
        ab_ane_workdir_remove(dir, *owned);
        return ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "cannot create %s: %s", path, strerror(e));
    }
    snprintf(path, sizeof path, "%s/model.mil", dir);
    if (write_file_atomic(path, mil, mil_len)) {
        int e = errno;
        ab_ane_workdir_remove(dir, *owned);
        return ab_ane_fail(err, errcap, AB_ANE_ECOMPILE, "cannot write %s: %s", path, strerror(e));
    }
    return AB_OK;
}

/* rm -r, a few levels deep at most (the compiler writes a shallow tree). */
static void remove_tree(const char *dir, int depth) {
    DIR *d = depth > 0 ? opendir(dir) : NULL;
    if (d) {
        struct dirent *ent;
        char path[AB_ANE_PATH];
        while ((ent = readdir(d)) != NULL) {
            if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
            snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
            struct stat sb;
            if (lstat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) remove_tree(path, depth - 1);
            else remove(path);
        }
        closedir(d);
    }
    rmdir(dir);
}

void ab_ane_workdir_remove(const char *dir, int owned) {
    if (owned && dir && dir[0]) remove_tree(dir, 4);
}
