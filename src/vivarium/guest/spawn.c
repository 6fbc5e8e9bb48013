/* vivarium-spawn: become a user in a new session, then exec a command.

   envd starts every process through this helper so that it can spawn with vfork: changing
   credentials or running Python code between fork and exec forces a full fork of envd, which
   under gVisor's ptrace platform costs tens of milliseconds per command.

   usage: vivarium-spawn UID GID GROUPS CTTY CWD -- CMD [ARGS...]
     GROUPS  comma-separated supplementary gids, or "-" for none
     CTTY    1: make fd 0 (a PTY slave) the controlling terminal of the new session
     CWD     working directory, entered as the user (so its permissions apply)

   On failure before exec it prints "vivarium-spawn: <what>: <why>" to stderr and exits 127. */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_GROUPS 256

static int fail(const char *what) {
    fprintf(stderr, "vivarium-spawn: %s: %s\n", what, strerror(errno));
    return 127;
}

static int parse_groups(char *list, gid_t *out) {
    int n = 0;
    if (strcmp(list, "-") == 0) return 0;
    for (char *tok = strtok(list, ","); tok && n < MAX_GROUPS; tok = strtok(NULL, ",")) {
        out[n++] = (gid_t)strtoul(tok, NULL, 10);
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 8 || strcmp(argv[6], "--") != 0) {
        fprintf(stderr, "usage: vivarium-spawn UID GID GROUPS CTTY CWD -- CMD [ARGS...]\n");
        return 127;
    }
    uid_t uid = (uid_t)strtoul(argv[1], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[2], NULL, 10);
    gid_t groups[MAX_GROUPS];
    int ngroups = parse_groups(argv[3], groups);

    if (setsid() < 0) return fail("setsid");
    if (strcmp(argv[4], "1") == 0 && ioctl(0, TIOCSCTTY, 0) < 0) return fail("TIOCSCTTY");
    if (getuid() == 0 || geteuid() == 0) {
        if (setgroups((size_t)ngroups, groups) < 0) return fail("setgroups");
        if (setgid(gid) < 0) return fail("setgid");
        if (setuid(uid) < 0) return fail("setuid");
    }
    if (chdir(argv[5]) < 0) return fail(argv[5]);
    execvp(argv[7], &argv[7]);
    return fail(argv[7]);
}
