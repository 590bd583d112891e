/* stand-in for <objc/message.h> (syntax checks on non-Apple hosts only) */
#ifndef STUB_OBJC_MESSAGE_H
#define STUB_OBJC_MESSAGE_H
#include <objc/runtime.h>
void objc_msgSend(void);   /* OBJC_OLD_DISPATCH_PROTOTYPES=0: callers cast */
#endif
