/* stand-in for <IOSurface/IOSurface.h> (syntax checks on non-Apple hosts only) */
#ifndef STUB_IOSURFACE_H
#define STUB_IOSURFACE_H
#include <CoreFoundation/CoreFoundation.h>
typedef struct __IOSurface *IOSurfaceRef;
typedef uint32_t IOSurfaceLockOptions;
typedef int kern_return_t;
enum { kIOSurfaceLockReadOnly = 0x00000001 };
extern const CFStringRef kIOSurfaceWidth, kIOSurfaceHeight, kIOSurfaceBytesPerElement,
    kIOSurfaceBytesPerRow, kIOSurfaceAllocSize, kIOSurfacePixelFormat;
IOSurfaceRef IOSurfaceCreate(CFDictionaryRef properties);
kern_return_t IOSurfaceLock(IOSurfaceRef buffer, IOSurfaceLockOptions options, uint32_t *seed);
kern_return_t IOSurfaceUnlock(IOSurfaceRef buffer, IOSurfaceLockOptions options, uint32_t *seed);
void *IOSurfaceGetBaseAddress(IOSurfaceRef buffer);
#endif
