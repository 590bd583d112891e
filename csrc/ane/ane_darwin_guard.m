/* ane_darwin_guard.m — the one piece of Objective-C: run a framework call
 * inside @try, so that an exception thrown by the private framework becomes
 * an error message (ane_darwin.c, guarded()) instead of terminating the
 * process. Plain C cannot catch Objective-C exceptions.
 *
 * Built only on macOS, and only when the build compiles this file and
 * defines AB_ANE_OBJC_GUARD for ane_darwin.c; without it the calls run
 * unguarded. Linux CI checks this file only against stand-in headers
 * (tests/test_ane_darwin_build.py); the macOS workflow compiles it. */
#import <Foundation/Foundation.h>
#include <stdlib.h>
#include <string.h>

int ab_ane_darwin_try(void (*fn)(void *), void *arg, char **msg);

int ab_ane_darwin_try(void (*fn)(void *), void *arg, char **msg) {
    *msg = NULL;
    @try {
        fn(arg);
        return 0;
    } @catch (NSException *e) {
        NSString *s = [NSString stringWithFormat:@"%@: %@", [e name], [e reason]];
        const char *u = [s UTF8String];
        *msg = strdup(u ? u : "(no description)");
        return 1;
    } @catch (id e) {
        *msg = strdup("an object that is not an NSException was thrown");
        return 1;
    }
}
