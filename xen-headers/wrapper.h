/*
 * xenmig's entry point for bindgen (see build.rs).
 *
 * It only includes the headers that the installed Xen development package
 * (Debian: libxen-dev) provides; nothing from Xen is copied here. build.rs
 * allowlists the few functions and types that src/xen uses, so the generated
 * bindings stay small and a change in an unrelated part of Xen's interface
 * does not affect us.
 */
#include <stdio.h>
#include <xentoollog.h>
#include <xenctrl.h>
#include <xenstore.h>
#include <libxl.h>
