/* stand-in for <objc/runtime.h> (syntax checks on non-Apple hosts only) */
#ifndef STUB_OBJC_RUNTIME_H
#define STUB_OBJC_RUNTIME_H
#include <stdbool.h>
typedef struct objc_class *Class;
typedef struct objc_object { Class isa; } *id;
typedef struct objc_selector *SEL;
typedef struct objc_method *Method;
typedef bool BOOL;
SEL sel_registerName(const char *str);
id objc_getClass(const char *name);
Method class_getClassMethod(Class cls, SEL name);
Method class_getInstanceMethod(Class cls, SEL name);
const char *class_getName(Class cls);
#endif
