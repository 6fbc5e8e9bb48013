/* vivarium-init: PID 1 of every sandbox. It starts and supervises envd and the template's
   services, reaps orphans, serves the sudo broker, kills the largest process group when the host
   says the sandbox is out of memory, contains fork bombs, and stops on SIGTERM.

   Why C: this process and its broker sit in every sandbox's memory for its whole life; as a
   Python program they cost ~12 MiB of each idle sandbox's ~40 MiB of guest memory. Static: it
   runs in any image (musl, no Python, an old glibc), so user and group names are read from
   /etc/passwd and /etc/group directly (no NSS modules to load).

   argv[1] is the Python that runs envd and the services (the template's, or our own runtime in
   an image). The services file has a line per service beside envd: `name module user port`.

   Sudo (for runsc releases that force NO_NEW_PRIVS, where setuid cannot work): guest/sudo.py
   connects to SUDO_SOCKET and sends a u32 big-endian length, then NUL-terminated strings:
   user, mode ("command", "login" or "shell"), preserve_env ("0"/"1"), cwd, argc, the argv, then
   the environment (KEY=VALUE) to the end, with its stdin, stdout and stderr as SCM_RIGHTS. We
   check the caller's uid (SO_PEERCRED), run the command as the user and reply with its exit code
   (i32 big-endian; 128 + the signal if it was killed). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define GUEST_LIB "/opt/vivarium/lib"
#define SERVICES_FILE "/opt/vivarium/services"
#define RUN_DIR "/run/vivarium"
#define SUDO_SOCKET RUN_DIR "/sudo.sock"
#define SUDO_GROUP "sudo"
#define SECURE_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define MAX_REQUEST (1u << 20)
#define MAX_SERVICES 16
#define MAX_GROUPS 256
#define RESTART_BACKOFF_S 1.0
/* A process group using less than this is no culprit: leave it alone. */
#define MIN_VICTIM_KB (16L << 10)
/* A user at the process limit (RLIMIT_NPROC, set by the host) this long is running a fork bomb:
   the sandbox crawls, since the bomb's processes retry fork() without end. Its session (every
   command envd starts has one) is killed, as the OOM killer kills the largest process. */
#define PROCESS_CHECK_S 1.0
#define FORK_BOMB_AFTER_S 5.0
#define FORK_BOMB_SHARE 0.8
#define FORK_BOMB_SAMPLE 4
#define STOP_PASSES 4
#define KILL_PASSES 2
#define MAX_PROCS 65536

struct service {
    char name[64], module[64], user[64];
    const char *arg; /* envd's --identity */
    pid_t pid;
    double restart_at; /* when it died: started again then */
};

static const char *python;
static struct service services[MAX_SERVICES];
static int nservices;
/* Sessions no OOM kill may touch: init's (with the sudo broker's handlers) and envd's (with its
   spawner), without which the sandbox cannot be reached. */
static pid_t protected_sessions[2] = {1, 0};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A line in the sandbox's log (the console), best effort. */
static void say(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    (void)!write(1, line, (size_t)n);
}

static void write_str(int fd, const char *a, const char *b, const char *c) {
    char line[512];
    int n = snprintf(line, sizeof line, "%s%s%s", a, b, c);
    if (n > 0) (void)!write(fd, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
}

/* ---- users and groups, from the files ---- */

static int find_user(const char *name, uid_t uid, struct passwd *out, char *buf, size_t len) {
    FILE *f = fopen("/etc/passwd", "re");
    if (!f) return 0;
    struct passwd *pw;
    int found = 0;
    while (!found && (pw = fgetpwent(f)))
        if (name ? strcmp(pw->pw_name, name) == 0 : pw->pw_uid == uid) {
            size_t need = strlen(pw->pw_name) + strlen(pw->pw_dir) + strlen(pw->pw_shell) + 3;
            if (need > len) break;
            *out = *pw;
            out->pw_name = strcpy(buf, pw->pw_name);
            out->pw_dir = strcpy(buf + strlen(buf) + 1, pw->pw_dir);
            out->pw_shell = strcpy(out->pw_dir + strlen(out->pw_dir) + 1, pw->pw_shell);
            if (!*out->pw_shell) out->pw_shell = "/bin/sh";
            found = 1;
        }
    fclose(f);
    return found;
}

static int is_member(const struct group *gr, const char *user) {
    for (char **m = gr->gr_mem; m && *m; m++)
        if (strcmp(*m, user) == 0) return 1;
    return 0;
}

/* The user's primary group and every group listing them, as initgroups(3) would. */
static int user_groups(const struct passwd *pw, gid_t *groups) {
    int n = 0;
    groups[n++] = pw->pw_gid;
    FILE *f = fopen("/etc/group", "re");
    if (!f) return n;
    struct group *gr;
    while (n < MAX_GROUPS && (gr = fgetgrent(f)))
        if (gr->gr_gid != pw->pw_gid && is_member(gr, pw->pw_name)) groups[n++] = gr->gr_gid;
    fclose(f);
    return n;
}

/* Root, or a member of the sudo group (the template puts `user` there). */
static int may_sudo(uid_t uid) {
    if (uid == 0) return 1;
    struct passwd pw;
    char buf[4096];
    if (!find_user(NULL, uid, &pw, buf, sizeof buf)) return 0;
    FILE *f = fopen("/etc/group", "re");
    if (!f) return 0;
    struct group *gr;
    int allowed = 0;
    while (!allowed && (gr = fgetgrent(f)))
        if (strcmp(gr->gr_name, SUDO_GROUP) == 0) allowed = is_member(gr, pw.pw_name);
    fclose(f);
    return allowed;
}

/* What a child of ours starts from: no blocked signals (ours are, for the signalfd). */
static void unblock_signals(void) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* ---- services ---- */

static void add_service(const char *name, const char *module, const char *user, const char *arg) {
    if (nservices == MAX_SERVICES) return;
    struct service *s = &services[nservices++];
    snprintf(s->name, sizeof s->name, "%s", name);
    snprintf(s->module, sizeof s->module, "%s", module);
    snprintf(s->user, sizeof s->user, "%s", user);
    s->arg = arg;
    s->pid = 0;
    s->restart_at = 0;
}

/* envd, then the template's own services (none in `base`). */
static void load_services(void) {
    add_service("envd", "envd", "root", "--identity");
    FILE *f = fopen(SERVICES_FILE, "re");
    if (!f) return;
    char line[256], name[64], module[64], user[64];
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "%63s %63s %63s", name, module, user) == 3)
            add_service(name, module, user, NULL);
    fclose(f);
}

/* Fork and exec a guest service as its user, in a session of its own, with a private runtime
   directory (/run/vivarium/NAME) and a clean environment. `python3 -I`: the user's PYTHONPATH,
   site-packages and current directory never reach our code. */
static void start_service(struct service *s) {
    struct passwd pw;
    char buf[4096];
    s->restart_at = 0;
    if (!find_user(s->user, 0, &pw, buf, sizeof buf)) {
        say("vivarium: service %s: no user %s", s->name, s->user);
        s->restart_at = now() + 60;
        return;
    }
    char run_dir[128], code[256], env_home[4200], env_user[128], env_logname[128], env_run[160];
    snprintf(run_dir, sizeof run_dir, RUN_DIR "/%s", s->name);
    mkdir(run_dir, 0700);
    (void)!chown(run_dir, pw.pw_uid, pw.pw_gid);
    snprintf(code, sizeof code,
             "import sys, runpy; sys.path.insert(0, '" GUEST_LIB "'); "
             "runpy.run_module('%s', run_name='__main__', alter_sys=True)",
             s->module);
    snprintf(env_home, sizeof env_home, "HOME=%s", pw.pw_dir);
    snprintf(env_user, sizeof env_user, "USER=%s", pw.pw_name);
    snprintf(env_logname, sizeof env_logname, "LOGNAME=%s", pw.pw_name);
    snprintf(env_run, sizeof env_run, "VIVARIUM_RUN_DIR=%s", run_dir);
    char *argv[] = {(char *)python, "-I", "-c", code, (char *)s->arg, NULL};
    char *envp[] = {env_home, env_user, env_logname, "PATH=" SECURE_PATH, "LANG=C.UTF-8",
                    env_run, NULL};
    gid_t groups[MAX_GROUPS];
    int ngroups = user_groups(&pw, groups);
    pid_t pid = fork();
    if (pid == 0) {
        unblock_signals();
        if (setsid() < 0 || setgroups((size_t)ngroups, groups) < 0 || setgid(pw.pw_gid) < 0 ||
            setuid(pw.pw_uid) < 0 || chdir(pw.pw_dir) < 0)
            _exit(127);
        execve(python, argv, envp);
        _exit(127);
    }
    if (pid < 0) {
        s->restart_at = now() + RESTART_BACKOFF_S;
        return;
    }
    s->pid = pid;
    if (strcmp(s->name, "envd") == 0) protected_sessions[1] = pid; /* setsid: its session */
}

/* ---- /proc ---- */

struct proc {
    pid_t pid, pgrp, sid;
    uid_t uid;
    char state; /* 'Z': a zombie */
};

/* The pids in /proc: a single directory read, cheap even while the sandbox crawls. */
static int list_pids(pid_t *out, int max) {
    DIR *d = opendir("/proc");
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while (n < max && (e = readdir(d)))
        if (e->d_name[0] >= '0' && e->d_name[0] <= '9') out[n++] = atoi(e->d_name);
    closedir(d);
    return n;
}

/* A process's ids into `out`: 1, or 0 if it is gone (or a zombie, unless `zombies`). */
static int read_process(pid_t pid, struct proc *out, int zombies) {
    char path[64], line[512];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d", pid);
    if (stat(path, &st) < 0) return 0;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t len = read(fd, line, sizeof line - 1);
    close(fd);
    if (len <= 0) return 0;
    line[len] = 0;
    char *after = strrchr(line, ')'), state;
    int ppid, pgrp, sid;
    if (!after || sscanf(after + 1, " %c %d %d %d", &state, &ppid, &pgrp, &sid) != 4) return 0;
    if (state == 'X' || (state == 'Z' && !zombies)) return 0;
    *out = (struct proc){pid, pgrp, sid, st.st_uid, state};
    return 1;
}

static pid_t pids[MAX_PROCS];

/* Every process, zombies only if `zombies`; returns how many were written to `out`. */
static int list_processes(struct proc *out, int max, int zombies) {
    int n = list_pids(pids, max), m = 0;
    for (int i = 0; i < n; i++) m += read_process(pids[i], &out[m], zombies);
    return m;
}

/* Resident KiB of a process (0 if it is gone), and its name. */
static long resident(pid_t pid, char *name, size_t len) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    long kib = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "Name:", 5) == 0 && name) {
            snprintf(name, len, "%s", line + 5 + strspn(line + 5, " \t"));
            name[strcspn(name, "\n")] = '\0';
        } else if (strncmp(line, "VmRSS:", 6) == 0) {
            kib = atol(line + 6);
        }
    }
    fclose(f);
    return kib;
}

static int is_protected(pid_t sid) {
    return sid == protected_sessions[0] || sid == protected_sessions[1];
}

static struct proc procs[MAX_PROCS];

/* The host says the sandbox is past its memory (SIGUSR1): kill the process group using the most
   (a command, with whatever it started), as a kernel's OOM killer kills the largest process, so
   the rest of the sandbox lives on. A whole group, since the memory may be spread over many
   processes (a forking loop). Logged to the console: the sandbox's log. */
static void out_of_memory(void) {
    static struct { pid_t pgrp; long kib; int count; char name[32]; } groups[MAX_PROCS];
    int n = list_processes(procs, MAX_PROCS, 0), ngroups = 0;
    for (int i = 0; i < n; i++) {
        if (is_protected(procs[i].sid)) continue;
        char name[32] = "";
        long kib = resident(procs[i].pid, name, sizeof name);
        int g = 0;
        while (g < ngroups && groups[g].pgrp != procs[i].pgrp) g++;
        if (g == ngroups) {
            groups[ngroups++] = (typeof(groups[0])){procs[i].pgrp, 0, 0, ""};
            snprintf(groups[g].name, sizeof groups[g].name, "%s", name);
        }
        groups[g].kib += kib;
        groups[g].count++;
        if (procs[i].pid == procs[i].pgrp) snprintf(groups[g].name, sizeof groups[g].name, "%s", name);
    }
    int victim = -1;
    for (int g = 0; g < ngroups; g++)
        if (victim < 0 || groups[g].kib > groups[victim].kib) victim = g;
    if (victim < 0 || groups[victim].kib < MIN_VICTIM_KB) return;
    if (killpg(groups[victim].pgrp, SIGKILL) < 0) {
        say("vivarium: out-of-memory kill failed: %s", strerror(errno));
        return;
    }
    say("vivarium: out of memory: killed process group %d (%s, %d process(es)), %ld MiB resident",
        groups[victim].pgrp, groups[victim].name, groups[victim].count, groups[victim].kib >> 10);
}

/* The user at the process limit, and since when (0: no one). */
static struct { uid_t uid; double since; } held;

static void contain_fork_bomb(void) {
    struct rlimit lim;
    if (getrlimit(RLIMIT_NPROC, &lim) < 0 || lim.rlim_cur == RLIM_INFINITY) return;
    double threshold = FORK_BOMB_SHARE * (double)lim.rlim_cur;
    /* Zombies count (readdir lists them): the kernel holds them against the limit until they
       are reaped, and most of a classic bomb (`:(){ :|:& };:`) is its exited shells. */
    double started = now();
    int n = list_pids(pids, MAX_PROCS);
    if (n < threshold) { /* the common case: one directory read */
        held.since = 0;
        return;
    }
    /* A sample, not every process. Each system call of ours waits its turn behind the bomb's
       processes (gVisor gives init no priority): reading every process took 25 s in a 1-CPU
       sandbox under a classic bomb, which then died out by itself, having frozen the sandbox
       for a minute. A bomb is most of the processes, so a sample finds it. */
    struct proc sample[FORK_BOMB_SAMPLE];
    int m = 0;
    /* One from each slice of the list: the first there not gone meanwhile (most of a bomb's
       processes live briefly). */
    for (int k = 0; k < FORK_BOMB_SAMPLE; k++)
        for (int i = k * n / FORK_BOMB_SAMPLE; i < (k + 1) * n / FORK_BOMB_SAMPLE; i++)
            if (read_process(pids[i], &sample[m], 1)) {
                m++;
                break;
            }
    if (m == 0) return; /* all gone: the next check tells */
    /* The user with most of the sample, and their session with most. */
    int user = -1, user_count = 0, session = -1, session_count = 0;
    for (int i = 0; i < m; i++) {
        if (sample[i].uid == 0) continue; /* exempt from the limit */
        int same = 0;
        for (int j = 0; j < m; j++) same += sample[j].uid == sample[i].uid;
        if (same > user_count) user = i, user_count = same;
    }
    for (int i = 0; user >= 0 && i < m; i++) {
        if (sample[i].uid != sample[user].uid) continue;
        int same = 0;
        for (int j = 0; j < m; j++)
            same += sample[j].uid == sample[i].uid && sample[j].sid == sample[i].sid;
        if (same > session_count) session = i, session_count = same;
    }
    /* A bomb has most of the processes: a user with most of the sample has the sandbox at its
       limit (root, exempt, is a few processes beside them). */
    if (user < 0 || 2 * user_count <= m) {
        held.since = 0;
        return;
    }
    uid_t uid = sample[user].uid;
    pid_t sid = sample[session].sid;
    /* Held since this check began: under a bomb a check can take longer than the wait, and
       the user was there at its start (the list) and at its end (the sample). */
    if (held.since == 0 || held.uid != uid) held.uid = uid, held.since = started;
    if (now() - held.since < FORK_BOMB_AFTER_S) return;
    /* Only the session's process groups in the sample (a bomb is one group, or a few): a full
       list of the session would cost what a full scan does. Stopped first, again and again:
       a child forked while its group is being signalled is missed by that pass and caught by
       the next, and a stopped process forks no more, so the kill meets no new children. */
    pid_t groups[FORK_BOMB_SAMPLE];
    int killed = 0, live = 0;
    for (int i = 0; i < m; i++) {
        if (sample[i].uid != uid || sample[i].sid != sid) continue;
        live += sample[i].state != 'Z';
        int seen = 0;
        for (int j = 0; j < killed; j++) seen |= groups[j] == sample[i].pgrp;
        if (!seen) groups[killed++] = sample[i].pgrp;
    }
    if (!live) return; /* a bomb killed already, its zombies not all reaped yet */
    for (int pass = 0; pass < STOP_PASSES + KILL_PASSES; pass++)
        for (int g = 0; g < killed; g++) killpg(groups[g], pass < STOP_PASSES ? SIGSTOP : SIGKILL);
    held.since = 0;
    say("vivarium: process limit: uid %u held the sandbox at %d processes, the limit is %lu; "
        "killed session %d (%d process group(s))", uid, n, (unsigned long)lim.rlim_cur, sid,
        killed);
}

/* ---- the sudo broker ---- */

static int read_full(int fd, char *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    return 0;
}

/* The next NUL-terminated string of the request, or NULL past its end. */
static char *next_field(char **p, char *end) {
    if (*p >= end) return NULL;
    char *s = *p, *nul = memchr(s, '\0', (size_t)(end - s));
    if (!nul) return NULL;
    *p = nul + 1;
    return s;
}

static int run_as(char *body, size_t len, const int *fds) {
    char *p = body, *end = body + len;
    char *user = next_field(&p, end), *mode = next_field(&p, end);
    char *preserve = next_field(&p, end), *cwd = next_field(&p, end);
    char *argc_s = next_field(&p, end);
    if (!argc_s) {
        write_str(fds[2], "sudo: malformed request", "", "\n");
        return 1;
    }
    long argc = atol(argc_s);
    if (argc < 0 || argc > (long)len) return 1;
    char **argv = calloc((size_t)argc + 5, sizeof *argv);
    char **envp = calloc(len / 2 + 8, sizeof *envp);
    if (!argv || !envp) return 1;
    for (long i = 0; i < argc; i++)
        if (!(argv[i] = next_field(&p, end))) return 1;
    int login = strcmp(mode, "login") == 0, shell = strcmp(mode, "shell") == 0;

    struct passwd pw;
    char buf[4096];
    if (!find_user(user, 0, &pw, buf, sizeof buf)) {
        write_str(fds[2], "sudo: unknown user ", user, "\n");
        return 1;
    }
    /* The caller's environment only with -E; else only its terminal and locale. */
    size_t nenv = 0;
    char *var;
    while ((var = next_field(&p, end)))
        if (strcmp(preserve, "1") == 0 || strncmp(var, "TERM=", 5) == 0 ||
            strncmp(var, "LANG=", 5) == 0 || strncmp(var, "LC_ALL=", 7) == 0)
            if (strncmp(var, "HOME=", 5) && strncmp(var, "USER=", 5) &&
                strncmp(var, "LOGNAME=", 8) && strncmp(var, "SHELL=", 6) &&
                strncmp(var, "PATH=", 5))
                envp[nenv++] = var;
    char home[4200], user_var[128], logname[128], shell_var[4200];
    snprintf(home, sizeof home, "HOME=%s", pw.pw_dir);
    snprintf(user_var, sizeof user_var, "USER=%s", pw.pw_name);
    snprintf(logname, sizeof logname, "LOGNAME=%s", pw.pw_name);
    snprintf(shell_var, sizeof shell_var, "SHELL=%s", pw.pw_shell);
    envp[nenv++] = home;
    envp[nenv++] = user_var;
    envp[nenv++] = logname;
    envp[nenv++] = shell_var;
    envp[nenv++] = "PATH=" SECURE_PATH;
    envp[nenv] = NULL;

    char *joined = NULL;
    if (login || shell) {
        size_t size = 1;
        for (long i = 0; i < argc; i++) size += strlen(argv[i]) + 1;
        joined = calloc(size, 1);
        if (!joined) return 1;
        for (long i = 0; i < argc; i++) {
            if (i) strcat(joined, " ");
            strcat(joined, argv[i]);
        }
        long n = 0;
        argv[n++] = pw.pw_shell;
        if (login) argv[n++] = "-l";
        if (argc) argv[n++] = "-c", argv[n++] = joined;
        argv[n] = NULL;
        argc = n;
    }
    if (argc == 0) return 1;
    const char *dir = login ? pw.pw_dir : (cwd && *cwd ? cwd : "/");
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) dir = "/";

    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < 3; i++) dup2(fds[i], i);
        for (int fd = 3; fd < 1024; fd++) close(fd);
        /* A session of its own: the OOM and fork-bomb checks may kill it, unlike ours. */
        if (setsid() < 0 || chdir(dir) < 0 || setgroups(0, NULL) < 0 || setgid(pw.pw_gid) < 0 ||
            setuid(pw.pw_uid) < 0)
            _exit(1);
        environ = envp; /* execvp searches the PATH of this environment */
        execvp(argv[0], argv);
        if (errno == ENOENT)
            write_str(2, "sudo: ", argv[0], ": command not found\n");
        else
            write_str(2, "sudo: ", argv[0], errno == EACCES ? ": Permission denied\n"
                                                            : ": cannot run\n");
        _exit(1);
    }
    if (pid < 0) return 1;
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return 1;
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/* One sudo request, in a child of ours: it waits for the command and answers with its code. */
static void serve_sudo(int conn) {
    struct ucred cred;
    socklen_t credlen = sizeof cred;
    int fds[3] = {-1, -1, -1}, nfds = 0;
    uint32_t length = 0;
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(3 * sizeof(int))];
    } control;
    struct iovec iov = {&length, sizeof length};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0 ||
        recvmsg(conn, &msg, MSG_WAITALL) != (ssize_t)sizeof length)
        _exit(0);
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < count; i++) {
                int fd = ((int *)CMSG_DATA(c))[i];
                if (nfds < 3)
                    fds[nfds++] = fd;
                else
                    close(fd);
            }
        }
    length = ntohl(length);
    int code = 1;
    if (nfds == 3 && length <= MAX_REQUEST) {
        char *body = malloc(length + 1);
        if (!body || read_full(conn, body, length) < 0) _exit(0);
        body[length] = '\0';
        if (!may_sudo(cred.uid))
            write_str(fds[2], "sudo: you are not allowed to use sudo in this sandbox", "", "\n");
        else
            code = run_as(body, length, fds);
    }
    uint32_t reply = htonl((uint32_t)code);
    (void)!write(conn, &reply, sizeof reply);
    _exit(0);
}

static int sudo_listen(void) {
    mkdir("/run", 0755); /* a bare image may have no /run */
    mkdir(RUN_DIR, 0755);
    unlink(SUDO_SOCKET);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX, .sun_path = SUDO_SOCKET};
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0) {
        say("vivarium: the sudo broker cannot listen: %s", strerror(errno));
        return -1;
    }
    chmod(SUDO_SOCKET, 0666); /* who may use it is decided per connection (SO_PEERCRED) */
    return fd;
}

static void accept_sudo(int listener, int sfd) {
    int conn;
    while ((conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
        pid_t pid = fork();
        if (pid == 0) {
            close(listener);
            close(sfd);
            unblock_signals();
            serve_sudo(conn);
        }
        close(conn);
    }
}

/* ---- the main loop ---- */

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (int i = 0; i < nservices; i++)
            if (services[i].pid == pid) { /* restarted after a pause, not in a tight loop */
                services[i].pid = 0;
                services[i].restart_at = now() + RESTART_BACKOFF_S;
            }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        say("usage: vivarium-init PYTHON");
        return 2;
    }
    python = argv[1];
    sigset_t handled;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGUSR1);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigprocmask(SIG_BLOCK, &handled, NULL);
    int sfd = signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) {
        say("vivarium: signalfd: %s", strerror(errno));
        return 1;
    }
    int listener = sudo_listen();
    load_services();
    for (int i = 0; i < nservices; i++) start_service(&services[i]);

    double next_check = now() + PROCESS_CHECK_S;
    for (;;) {
        double t = now(), wake = next_check;
        for (int i = 0; i < nservices; i++)
            if (services[i].restart_at > 0 && services[i].restart_at < wake)
                wake = services[i].restart_at;
        int timeout = wake > t ? (int)((wake - t) * 1000) + 1 : 0;
        struct pollfd watch[2] = {{sfd, POLLIN, 0}, {listener, POLLIN, 0}};
        int ready = poll(watch, listener >= 0 ? 2 : 1, timeout);
        if (ready < 0 && errno != EINTR) return 1;
        struct signalfd_siginfo info;
        int oom = 0;
        while (read(sfd, &info, sizeof info) == (ssize_t)sizeof info) {
            if (info.ssi_signo == SIGTERM || info.ssi_signo == SIGINT) return 0;
            if (info.ssi_signo == SIGUSR1) oom = 1;
        }
        reap(); /* every time: SIGCHLDs coalesce */
        if (oom) out_of_memory();
        if (listener >= 0 && (watch[1].revents & POLLIN)) accept_sudo(listener, sfd);
        t = now();
        for (int i = 0; i < nservices; i++)
            if (services[i].restart_at > 0 && services[i].restart_at <= t)
                start_service(&services[i]);
        if (t >= next_check) {
            /* Armed again only after the check: a check slower than the period must not run
               back to back, which would keep this loop from reaping what it killed. */
            contain_fork_bomb();
            next_check = now() + PROCESS_CHECK_S;
        }
    }
}
