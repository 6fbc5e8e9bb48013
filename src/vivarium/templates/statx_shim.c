/* Old gVisor rejects AT_NO_AUTOMOUNT in statx(2) with EINVAL; GNU coreutils always passes it.
   The flag is meaningless inside a sandbox (no automounts), so drop it before the real syscall. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}
