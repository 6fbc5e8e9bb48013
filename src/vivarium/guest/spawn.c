/* vivarium-spawn: envd's process spawner, a small resident process that starts every command.

   Why a separate process: under gVisor's ptrace platform each exec and each new thread is
   expensive, and envd (Python) cannot change credentials between fork and exec without a full
   fork of itself (~45 ms). This spawner is tiny and already running (it is in the template
   checkpoint), so a command costs one vfork + exec of the command itself: no helper exec, no
   thread per process in envd.

   envd starts it with a connected AF_UNIX stream socket as fd 0 and talks to it in native byte
   order (both ends are on the same machine):

   request  = header, then `length` bytes: ngroups gids (u32), then NUL-terminated strings:
              cwd, argv[0..nargv), env[0..nenv); with exactly 3 fds (stdin, stdout, stderr)
              attached as SCM_RIGHTS.
   header   = u32 length, id, uid, gid, flags, ngroups, nargv, nenv     (flags: 1 = PTY ctty)
   reply    = u32 kind, u32 id, i32 a, i32 b
     STARTED  (1): id, a = pid
     FAILED   (2): id, a = stage (1 setsid, 2 ctty, 3 credentials, 4 cwd, 5 exec), b = errno
     EXITED   (3): id = 0, a = pid, b = wait status
   The spawner exits when envd closes the socket; its running children then belong to init.

   Each child: a new session (a PTY slave on fd 0 becomes its controlling terminal), the user's
   groups, gid and uid (when the spawner runs as root), the working directory entered as that
   user, default signal dispositions, then exec with a PATH search in the request's PATH. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

enum { STARTED = 1, FAILED = 2, EXITED = 3 };
enum { STAGE_SETSID = 1, STAGE_CTTY, STAGE_CREDS, STAGE_CWD, STAGE_EXEC };
enum { FLAG_CTTY = 1 };

#define MAX_BODY (64u << 20) /* far above ARG_MAX: anything larger is a broken peer */
#define MAX_GROUPS 65536u
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"

struct header {
    uint32_t length, id, uid, gid, flags, ngroups, nargv, nenv;
};

struct reply {
    uint32_t kind, id;
    int32_t a, b;
};

static int sock = 0;
static int sigpipe_fds[2];
/* Written by the vfork child (which shares our memory) when it fails before exec. */
static volatile int child_stage, child_errno;
static char candidate[PATH_MAX];

static void on_sigchld(int sig) {
    (void)sig;
    int saved = errno;
    (void)!write(sigpipe_fds[1], "", 1);
    errno = saved;
}

static void send_reply(uint32_t kind, uint32_t id, int32_t a, int32_t b) {
    struct reply r = {kind, id, a, b};
    const char *p = (const char *)&r;
    size_t left = sizeof r;
    while (left > 0) {
        ssize_t n = write(sock, p, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) _exit(0); /* envd is gone */
        p += n;
        left -= (size_t)n;
    }
}

/* Read exactly len bytes; collect any fds passed along. Returns 0 at EOF before any byte. */
static int read_full(void *buf, size_t len, int *fds, int *nfds) {
    char *p = buf;
    size_t got = 0;
    while (got < len) {
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(3 * sizeof(int))];
        } control;
        struct iovec iov = {p + got, len - got};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (got == 0 && n == 0) return 0;
            _exit(0);
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int *passed = (int *)CMSG_DATA(c);
            for (int i = 0; i < count; i++) {
                if (fds && *nfds < 3)
                    fds[(*nfds)++] = passed[i];
                else
                    close(passed[i]);
            }
        }
        got += (size_t)n;
    }
    return 1;
}

/* In the vfork child: record why it failed and leave without touching shared state. */
static void child_fail(int stage) {
    child_stage = stage;
    child_errno = errno;
    _exit(127);
}

static void child_exec(char **argv, char **envp, const char *path, char **sh_argv) {
    const char *cmd = argv[0];
    if (strchr(cmd, '/')) {
        execve(cmd, argv, envp);
        if (errno == ENOEXEC) execve("/bin/sh", sh_argv, envp);
        child_fail(STAGE_EXEC);
    }
    int seen_eacces = 0;
    size_t cmdlen = strlen(cmd);
    for (const char *dir = path;;) {
        const char *end = strchrnul(dir, ':');
        size_t dirlen = (size_t)(end - dir);
        const char *from = dirlen ? dir : "."; /* an empty PATH entry is the cwd */
        if (!dirlen) dirlen = 1;
        if (dirlen + 1 + cmdlen + 1 <= sizeof candidate) {
            memcpy(candidate, from, dirlen);
            candidate[dirlen] = '/';
            memcpy(candidate + dirlen + 1, cmd, cmdlen + 1);
            execve(candidate, argv, envp);
            if (errno == ENOEXEC) {
                sh_argv[1] = candidate;
                execve("/bin/sh", sh_argv, envp);
            }
            if (errno == EACCES) seen_eacces = 1;
        }
        if (*end == '\0') break;
        dir = end + 1;
    }
    errno = seen_eacces ? EACCES : ENOENT;
    child_fail(STAGE_EXEC);
}

static void handle_request(void) {
    struct header h;
    int fds[3], nfds = 0;
    if (!read_full(&h, sizeof h, fds, &nfds)) _exit(0);
    if (h.length > MAX_BODY || h.ngroups > MAX_GROUPS) _exit(2);
    char *body = malloc((size_t)h.length + 1);
    if (!body) _exit(3);
    if (h.length > 0) read_full(body, h.length, fds, &nfds);
    body[h.length] = '\0';

    size_t groups_len = (size_t)h.ngroups * sizeof(uint32_t);
    char **argv = calloc((size_t)h.nargv + 1, sizeof *argv);
    char **envp = calloc((size_t)h.nenv + 1, sizeof *envp);
    char **sh_argv = calloc((size_t)h.nargv + 2, sizeof *sh_argv);
    if (!argv || !envp || !sh_argv) _exit(3);
    /* Walk the strings; a short body leaves the rest NULL, which fails the request below. */
    char *p = body + (groups_len <= h.length ? groups_len : h.length), *end = body + h.length;
    const char *cwd = NULL;
    uint32_t filled = 0, total = 1 + h.nargv + h.nenv;
    for (; filled < total && p < end; filled++) {
        if (filled == 0)
            cwd = p;
        else if (filled <= h.nargv)
            argv[filled - 1] = p;
        else
            envp[filled - 1 - h.nargv] = p;
        p += strlen(p) + 1;
    }
    const char *path = DEFAULT_PATH;
    for (uint32_t i = 0; i < h.nenv && envp[i]; i++)
        if (strncmp(envp[i], "PATH=", 5) == 0) path = envp[i] + 5;
    sh_argv[0] = "/bin/sh";
    sh_argv[1] = argv[0];
    for (uint32_t i = 1; i < h.nargv; i++) sh_argv[i + 1] = argv[i];
    int root = geteuid() == 0;

    if (nfds != 3 || filled != total || groups_len > h.length || h.nargv == 0) {
        send_reply(FAILED, h.id, STAGE_EXEC, EINVAL);
    } else {
        child_stage = 0;
        child_errno = 0;
        pid_t pid = vfork();
        if (pid == 0) {
            for (int i = 0; i < 3; i++)
                if (dup2(fds[i], i) < 0) child_fail(STAGE_EXEC);
            if (setsid() < 0) child_fail(STAGE_SETSID);
            if ((h.flags & FLAG_CTTY) && ioctl(0, TIOCSCTTY, 0) < 0) child_fail(STAGE_CTTY);
            /* Raw syscalls: glibc's wrappers may coordinate with other threads via shared
               state, which a vfork child must not touch. */
            if (root && (syscall(SYS_setgroups, (size_t)h.ngroups, (gid_t *)body) < 0 ||
                         syscall(SYS_setresgid, h.gid, h.gid, h.gid) < 0 ||
                         syscall(SYS_setresuid, h.uid, h.uid, h.uid) < 0))
                child_fail(STAGE_CREDS);
            if (chdir(cwd) < 0) child_fail(STAGE_CWD);
            child_exec(argv, envp, path, sh_argv);
        }
        if (pid < 0) {
            send_reply(FAILED, h.id, STAGE_EXEC, errno);
        } else if (child_stage != 0) {
            int status;
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
            send_reply(FAILED, h.id, child_stage, child_errno);
        } else {
            send_reply(STARTED, h.id, pid, 0);
        }
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    free(argv);
    free(envp);
    free(sh_argv);
    free(body);
}

static void reap(void) {
    char drain[64];
    while (read(sigpipe_fds[0], drain, sizeof drain) > 0) {
    }
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) send_reply(EXITED, 0, pid, status);
}

int main(void) {
    /* Children get default dispositions: envd's Python ignores SIGPIPE, and an ignored signal
       survives exec (`yes | head` would fail with EPIPE instead of ending quietly). */
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    fcntl(sock, F_SETFD, FD_CLOEXEC);
    if (pipe2(sigpipe_fds, O_CLOEXEC | O_NONBLOCK) < 0) return 1;
    struct sigaction sa = {0};
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);

    struct pollfd watch[2] = {{sock, POLLIN, 0}, {sigpipe_fds[0], POLLIN, 0}};
    for (;;) {
        if (poll(watch, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (watch[1].revents) reap();
        if (watch[0].revents & (POLLIN | POLLHUP | POLLERR)) handle_request();
    }
}
