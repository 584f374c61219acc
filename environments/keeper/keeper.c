/*
 * lsl-keeper: holds an environment's terminal sessions inside its container, so that shells
 * outlive the LSL server process that shows them (restart, upgrade, kill -9).
 *
 * Built static (scripts/build_keeper.sh) so one binary runs on every image, glibc or musl or
 * BusyBox; LSL copies it into each container as /.lsl/keeper and the container's own command
 * ends in `exec /.lsl/keeper serve` (environments/identity.py).
 *
 *   lsl-keeper serve  [--socket PATH] [--ring BYTES]   the daemon (root, the container's main process)
 *   lsl-keeper attach [--socket PATH]                  relay stdin/stdout <-> the daemon's socket
 *   lsl-keeper version
 *
 * The daemon owns each session's PTY and shell, and keeps the last --ring bytes of its output
 * with their stream offsets. A server attaches over the Unix socket (directly, when the socket's
 * directory is bind-mounted from the host, or through `docker exec lsl-keeper attach`), asks for
 * the output from an offset it knows, and from then on gets it live. One attachment per session:
 * a newer one takes over and the older is told so ('T'); the server's own lease decides who may.
 * While nobody is attached the shell keeps running and its output goes to the ring.
 *
 * It is also the way in to the container's TCP ports (`lsl forward`, the browser preview): a 'T'
 * request forks a child that connects to 127.0.0.1:<port> (then ::1) and from then on copies raw
 * bytes both ways, so LSL never needs the container's address or a published port, and can reach
 * nothing but the container's own loopback. 'N' lists its listening sockets (/proc/net/tcp*).
 *
 * Wire format (both ways): type (1 byte), payload length (4 bytes, big-endian), payload.
 * The protocol is documented in docs/protocol.md ("The session keeper").
 *
 * Threading: one thread, one poll() loop; children (shells and tunnels) are reaped on SIGCHLD
 * through a self-pipe. A tunnel is a process of its own, so a flood through it never delays a
 * terminal, and it holds no descriptor of the daemon's.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define KEEPER_VERSION "3"
#define DEFAULT_SOCKET "/.lsl/run/keeper.sock"
#define DEFAULT_RING (2u << 20)      /* bytes of output kept per session */
#define MAX_FRAME (1u << 20)         /* largest payload a client may send */
#define MAX_SESSIONS 256
#define MAX_CLIENTS 512
#define DATA_CHUNK (64u << 10)       /* largest 'D' payload */
#define INBUF_MAX (1u << 20)         /* input waiting for the PTY, per session */
#define KILL_GRACE_MS 1500           /* HUP, then KILL this much later */
#define MARKS 2048                  /* (offset, read time) marks per session: 10 s at one per MARK_EVERY_US */
#define MARK_EVERY_US 5000
#define EXITED_KEEP_MS (10 * 60 * 1000) /* an exited session is remembered this long for a late server */

typedef struct Client Client;

typedef struct {
    int used;
    char id[65];
    pid_t pid;
    int master;              /* -1 once closed */
    unsigned cols, rows;
    /* output ring: bytes [total - len, total) are kept */
    unsigned char *ring;
    size_t cap, start, len;  /* start: index of the oldest kept byte */
    uint64_t total;
    /* when output was read from the PTY: a mark at most every MARK_EVERY_US, so a server can tell
     * how long the bytes it gets waited here (its lag bound counts this queue too) */
    uint64_t mark_off[MARKS];
    long long mark_us[MARKS];
    int mark_head, mark_count;
    /* input not yet accepted by the PTY */
    unsigned char *in;
    size_t in_len;
    int exited;              /* the shell was reaped */
    int status;              /* its exit code (128+signal for a signal) */
    int drained;             /* the PTY gave EOF/EIO: no more output */
    long long ended_at_ms;
    long long kill_at_ms;    /* KILL the group at this time (0: none) */
    Client *attached;
} Session;

struct Client {
    int used;
    int fd;
    unsigned char *inb; size_t in_len, in_cap;       /* bytes received, not yet parsed */
    unsigned char *outb; size_t out_len, out_off, out_cap;
    Session *session;        /* attached to */
    uint64_t sent;           /* next output offset to send */
    int closing;             /* close once out is flushed */
    int exit_sent;
};

static Session sessions[MAX_SESSIONS];
static Client clients[MAX_CLIENTS];
static size_t ring_cap = DEFAULT_RING;
static int sig_pipe[2] = {-1, -1};

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long long wall_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }
static void set_cloexec(int fd) { fcntl(fd, F_SETFD, FD_CLOEXEC); }

static void on_signal(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    if (write(sig_pipe[1], &b, 1) < 0) { /* the pipe is full: a wake-up is already pending */ }
    errno = saved;
}

/* ---- output to a client ---------------------------------------------------------------- */

static int out_reserve(Client *c, size_t more) {
    if (c->out_off > 0 && c->out_off == c->out_len) c->out_off = c->out_len = 0;
    if (c->out_len + more <= c->out_cap) return 0;
    if (c->out_off > 0) {
        memmove(c->outb, c->outb + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
        if (c->out_len + more <= c->out_cap) return 0;
    }
    size_t cap = c->out_cap ? c->out_cap : 4096;
    while (cap < c->out_len + more) cap *= 2;
    unsigned char *p = realloc(c->outb, cap);
    if (!p) return -1;
    c->outb = p;
    c->out_cap = cap;
    return 0;
}

static void put_frame(Client *c, char type, const void *payload, size_t n) {
    if (out_reserve(c, 5 + n) < 0) { c->closing = 1; return; }
    unsigned char *p = c->outb + c->out_len;
    p[0] = (unsigned char)type;
    p[1] = (unsigned char)(n >> 24); p[2] = (unsigned char)(n >> 16);
    p[3] = (unsigned char)(n >> 8); p[4] = (unsigned char)n;
    if (n) memcpy(p + 5, payload, n);
    c->out_len += 5 + n;
}

static void put_text(Client *c, char type, const char *text) { put_frame(c, type, text, strlen(text)); }

static size_t pending_out(Client *c) { return c->out_len - c->out_off; }

/* When the byte at `offset` was read from the PTY (the newest mark at or before it; the oldest kept
 * mark if it is older than all of them). */
static long long read_time(Session *s, uint64_t offset) {
    long long found = 0;
    for (int k = 0; k < s->mark_count; k++) {
        int i = (s->mark_head - 1 - k + MARKS) % MARKS;
        found = s->mark_us[i];
        if (s->mark_off[i] <= offset) break;
    }
    return found ? found : wall_us();
}

/* Queue the next piece of the attached session's output (from c->sent) as a 'D' frame. */
static void fill_data(Client *c) {
    Session *s = c->session;
    if (!s || pending_out(c) >= DATA_CHUNK) return;
    uint64_t first = s->total - s->len;
    if (c->sent < first) c->sent = first; /* only when it was never sent: see the 'O' handling */
    while (c->sent < s->total && pending_out(c) < DATA_CHUNK) {
        size_t n = (size_t)(s->total - c->sent);
        if (n > DATA_CHUNK) n = DATA_CHUNK;
        size_t idx = (s->start + (size_t)(c->sent - first)) % s->cap;
        if (idx + n > s->cap) n = s->cap - idx; /* up to the ring's wrap */
        if (out_reserve(c, 5 + 16 + n) < 0) { c->closing = 1; return; }
        unsigned char *p = c->outb + c->out_len;
        size_t len = 16 + n;
        long long read_at = read_time(s, c->sent);
        p[0] = 'D';
        p[1] = (unsigned char)(len >> 24); p[2] = (unsigned char)(len >> 16);
        p[3] = (unsigned char)(len >> 8); p[4] = (unsigned char)len;
        for (int i = 0; i < 8; i++) p[5 + i] = (unsigned char)(c->sent >> (56 - 8 * i));
        for (int i = 0; i < 8; i++) p[13 + i] = (unsigned char)((unsigned long long)read_at >> (56 - 8 * i));
        memcpy(p + 21, s->ring + idx, n);
        c->out_len += 5 + len;
        c->sent += n;
    }
    if (c->sent == s->total && s->exited && s->drained && !c->exit_sent) {
        unsigned char code[4] = {(unsigned char)(s->status >> 24), (unsigned char)(s->status >> 16),
                                 (unsigned char)(s->status >> 8), (unsigned char)s->status};
        put_frame(c, 'X', code, 4);
        c->exit_sent = 1;
    }
}

static void close_client(Client *c) {
    if (c->session && c->session->attached == c) c->session->attached = NULL;
    close(c->fd);
    free(c->inb);
    free(c->outb);
    memset(c, 0, sizeof *c);
}

/* ---- sessions --------------------------------------------------------------------------- */

static Session *find_session(const char *id) {
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].used && strcmp(sessions[i].id, id) == 0) return &sessions[i];
    return NULL;
}

static void free_session(Session *s) {
    if (s->attached) { s->attached->session = NULL; s->attached->closing = 1; }
    if (s->master >= 0) close(s->master);
    free(s->ring);
    free(s->in);
    memset(s, 0, sizeof *s);
    s->master = -1;
}

static void ring_append(Session *s, const unsigned char *data, size_t n) {
    long long now = wall_us();
    int last = (s->mark_head - 1 + MARKS) % MARKS;
    if (s->mark_count == 0 || now - s->mark_us[last] >= MARK_EVERY_US) {
        s->mark_off[s->mark_head] = s->total;
        s->mark_us[s->mark_head] = now;
        s->mark_head = (s->mark_head + 1) % MARKS;
        if (s->mark_count < MARKS) s->mark_count++;
    }
    if (n >= s->cap) { data += n - s->cap; s->total += n - s->cap; n = s->cap; s->start = 0; s->len = 0; }
    size_t end = (s->start + s->len) % s->cap;
    size_t first = n < s->cap - end ? n : s->cap - end;
    memcpy(s->ring + end, data, first);
    memcpy(s->ring, data + first, n - first);
    s->len += n;
    if (s->len > s->cap) { s->start = (s->start + (s->len - s->cap)) % s->cap; s->len = s->cap; }
    s->total += n;
}

static int valid_id(const char *id) {
    size_t n = strlen(id);
    if (n == 0 || n > 64) return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = id[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_'))
            return 0;
    }
    return 1;
}

typedef struct {
    const char *id;
    unsigned cols, rows;
    uid_t uid; gid_t gid;
    const char *cwd;
    char *argv[64]; int argc;
    char *envp[128]; int envc;
    uint64_t from;
    int create;
} OpenRequest;

extern char **environ;

/* The shell gets the container's environment (the image's and the template's variables, which the
 * keeper inherited as the container's main process) with the request's variables on top. */
static void exec_in_child(OpenRequest *r) {
    for (int i = 0; i < r->envc; i++) putenv(r->envp[i]);
    const char *path = r->argv[0];
    char buf[4096];
    if (!strchr(path, '/')) {
        const char *search = getenv("PATH");
        if (!search || !*search) search = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        const char *p = search;
        while (*p) {
            const char *colon = strchr(p, ':');
            size_t dl = colon ? (size_t)(colon - p) : strlen(p);
            if (dl && dl + 1 + strlen(path) < sizeof buf) {
                memcpy(buf, p, dl);
                buf[dl] = '/';
                strcpy(buf + dl + 1, path);
                if (access(buf, X_OK) == 0) { path = buf; break; }
            }
            p = colon ? colon + 1 : p + dl;
        }
    }
    execve(path, r->argv, environ);
    dprintf(2, "lsl-keeper: cannot run %s: %s\r\n", r->argv[0], strerror(errno));
    _exit(127);
}

static const char *spawn(Session *s, OpenRequest *r) {
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0) return "posix_openpt failed";
    if (grantpt(master) < 0 || unlockpt(master) < 0) { close(master); return "cannot unlock the pty"; }
    char *slave_name = ptsname(master);
    if (!slave_name) { close(master); return "ptsname failed"; }
    char slave_path[128];
    snprintf(slave_path, sizeof slave_path, "%s", slave_name);
    struct winsize ws = {.ws_row = (unsigned short)r->rows, .ws_col = (unsigned short)r->cols};
    ioctl(master, TIOCSWINSZ, &ws);
    pid_t pid = fork();
    if (pid < 0) { close(master); return "fork failed"; }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL); signal(SIGCHLD, SIG_DFL); signal(SIGTERM, SIG_DFL); signal(SIGHUP, SIG_DFL);
        setsid();
        int slave = open(slave_path, O_RDWR);
        if (slave < 0) _exit(126);
        ioctl(slave, TIOCSCTTY, 0);
        dup2(slave, 0); dup2(slave, 1); dup2(slave, 2);
        for (int fd = 3; fd < 1024; fd++) close(fd);
        if (getuid() == 0) {
            gid_t groups[1] = {r->gid};
            if (setgroups(1, groups) < 0 || setgid(r->gid) < 0 || setuid(r->uid) < 0) {
                dprintf(2, "lsl-keeper: cannot become %u:%u: %s\r\n", (unsigned)r->uid, (unsigned)r->gid, strerror(errno));
                _exit(126);
            }
        }
        if (!r->cwd || chdir(r->cwd) < 0) {
            const char *home = NULL;
            for (int i = 0; i < r->envc; i++) if (strncmp(r->envp[i], "HOME=", 5) == 0) home = r->envp[i] + 5;
            /* a missing working directory is not fatal: the shell starts at home, or at / */
            if (!home || chdir(home) < 0) { if (chdir("/") < 0) _exit(126); }
        }
        exec_in_child(r);
    }
    set_nonblock(master);
    set_cloexec(master);
    s->pid = pid;
    s->master = master;
    return NULL;
}

static Session *new_session(const char *id) {
    for (int i = 0; i < MAX_SESSIONS; i++) {
        Session *s = &sessions[i];
        if (!s->used) {
            memset(s, 0, sizeof *s);
            s->used = 1;
            s->master = -1;
            snprintf(s->id, sizeof s->id, "%s", id);
            s->cap = ring_cap;
            s->ring = malloc(s->cap);
            if (!s->ring) { s->used = 0; return NULL; }
            return s;
        }
    }
    return NULL;
}

static void kill_session(Session *s) {
    if (s->exited || s->pid <= 0) return;
    kill(-s->pid, SIGHUP);
    kill(s->pid, SIGHUP);
    s->kill_at_ms = now_ms() + KILL_GRACE_MS;
}

/* ---- requests ------------------------------------------------------------------------- */

static int parse_open(unsigned char *payload, size_t n, OpenRequest *r) {
    memset(r, 0, sizeof *r);
    r->cols = 80; r->rows = 24; r->create = 1;
    size_t i = 0;
    while (i < n) {
        char *item = (char *)payload + i;
        size_t len = strnlen(item, n - i);
        if (i + len >= n) return -1; /* every item ends with NUL */
        i += len + 1;
        char *eq = strchr(item, '=');
        if (!eq) return -1;
        *eq = 0;
        char *v = eq + 1;
        if (!strcmp(item, "id")) r->id = v;
        else if (!strcmp(item, "cols")) r->cols = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(item, "rows")) r->rows = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(item, "uid")) r->uid = (uid_t)strtoul(v, NULL, 10);
        else if (!strcmp(item, "gid")) r->gid = (gid_t)strtoul(v, NULL, 10);
        else if (!strcmp(item, "cwd")) r->cwd = v;
        else if (!strcmp(item, "from")) r->from = strtoull(v, NULL, 10);
        else if (!strcmp(item, "create")) r->create = strcmp(v, "0") != 0;
        else if (!strcmp(item, "arg")) { if (r->argc < 63) r->argv[r->argc++] = v; else return -1; }
        else if (!strcmp(item, "env")) { if (r->envc < 127) r->envp[r->envc++] = v; else return -1; }
        /* unknown keys are ignored: a newer server may send more */
    }
    if (r->cols < 2 || r->cols > 1000) r->cols = 80;
    if (r->rows < 2 || r->rows > 1000) r->rows = 24;
    r->argv[r->argc] = NULL;
    r->envp[r->envc] = NULL;
    return r->id ? 0 : -1;
}

static void handle_open(Client *c, unsigned char *payload, size_t n) {
    OpenRequest r;
    if (parse_open(payload, n, &r) < 0 || !valid_id(r.id)) { put_text(c, 'E', "bad open request"); c->closing = 1; return; }
    Session *s = find_session(r.id);
    int created = 0;
    if (!s) {
        if (!r.create) { put_text(c, 'E', "no such session"); c->closing = 1; return; }
        if (r.argc == 0) { put_text(c, 'E', "no command"); c->closing = 1; return; }
        s = new_session(r.id);
        if (!s) { put_text(c, 'E', "too many sessions"); c->closing = 1; return; }
        s->cols = r.cols; s->rows = r.rows;
        const char *err = spawn(s, &r);
        if (err) { put_text(c, 'E', err); c->closing = 1; free_session(s); return; }
        created = 1;
    }
    if (s->attached && s->attached != c) {
        put_frame(s->attached, 'T', NULL, 0); /* taken over: the older server must stop serving */
        s->attached->session = NULL;
        s->attached->closing = 1;
    }
    s->attached = c;
    c->session = s;
    uint64_t first = s->total - s->len;
    c->sent = r.from < first ? first : (r.from > s->total ? s->total : r.from);
    char hello[256];
    int len = snprintf(hello, sizeof hello, "version=" KEEPER_VERSION "%ccreated=%d%cpid=%d%cstart=%llu%cend=%llu%cfrom=%llu%ccols=%u%crows=%u%cexited=%d",
                       0, created, 0, (int)s->pid, 0, (unsigned long long)first, 0, (unsigned long long)s->total, 0,
                       (unsigned long long)c->sent, 0, s->cols, 0, s->rows, 0, s->exited);
    put_frame(c, 'H', hello, (size_t)len);
    fill_data(c);
}

static void write_input(Session *s) {
    while (s->in_len && s->master >= 0) {
        ssize_t w = write(s->master, s->in, s->in_len);
        if (w < 0) { if (errno == EINTR) continue; if (errno != EAGAIN) s->in_len = 0; return; }
        memmove(s->in, s->in + w, s->in_len - (size_t)w);
        s->in_len -= (size_t)w;
    }
}

static void handle_input(Session *s, const unsigned char *data, size_t n) {
    if (s->master < 0 || s->exited) return;
    if (s->in_len + n > INBUF_MAX) return; /* the shell is not reading: drop, as a full tty would block */
    unsigned char *p = realloc(s->in, s->in_len + n);
    if (!p) return;
    s->in = p;
    memcpy(s->in + s->in_len, data, n);
    s->in_len += n;
    write_input(s);
}

static void handle_list(Client *c) {
    char *text = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&text, &size);
    if (!f) { c->closing = 1; return; }
    for (int i = 0; i < MAX_SESSIONS; i++) {
        Session *s = &sessions[i];
        if (!s->used) continue;
        fprintf(f, "%s %d %d %d %llu %d\n", s->id, (int)s->pid, s->exited ? 0 : 1, s->exited ? s->status : -1,
                (unsigned long long)s->total, s->attached ? 1 : 0);
    }
    fclose(f);
    put_frame(c, 'l', text, size);
    free(text);
    c->closing = 1;
}

/* ---- tunnels: a raw byte pipe to a TCP port inside the container ------------------------- */

#define TUNNEL_BUF (64u << 10)       /* bytes in flight per direction */
#define CONNECT_TIMEOUT_S 10

/* Write all of `n` bytes to a non-blocking fd, waiting for room (only for the short reply frame). */
static int write_all_fd(int fd, const void *data, size_t n) {
    const unsigned char *p = data;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { struct pollfd pf = {.fd = fd, .events = POLLOUT}; poll(&pf, 1, 1000); continue; }
            return -1;
        }
        p += w; n -= (size_t)w;
    }
    return 0;
}

static void write_frame_fd(int fd, char type, const char *text) {
    size_t n = text ? strlen(text) : 0;
    unsigned char head[5] = {(unsigned char)type, (unsigned char)(n >> 24), (unsigned char)(n >> 16),
                             (unsigned char)(n >> 8), (unsigned char)n};
    if (write_all_fd(fd, head, 5) == 0 && n) write_all_fd(fd, text, n);
}

/* A blocking connect to loopback (SO_SNDTIMEO bounds it: a full accept queue would otherwise stall
 * for the kernel's SYN retries); -1 with errno on failure. */
static int connect_loopback(int family, unsigned port) {
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct timeval tv = {.tv_sec = CONNECT_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int rc;
    if (family == AF_INET) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    } else {
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port), .sin6_addr = IN6ADDR_LOOPBACK_INIT};
        rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    }
    if (rc < 0) { int saved = errno; close(fd); errno = saved; return -1; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* a pipe adds no batching of its own */
    return fd;
}

/* Close every descriptor but 0-2 and `keep`: the child must not hold the listening socket (a
 * restarted keeper could not bind), other clients (they would never see EOF) or a PTY master (the
 * session would not end with its shell). */
static int close_all_but(int keep) {
    if (keep != 3) { if (dup2(keep, 3) < 0) _exit(1); keep = 3; }
    if (close_range(4, ~0u, 0) == 0) return keep;
    long max = sysconf(_SC_OPEN_MAX); /* a kernel before 5.9 */
    if (max < 0 || max > 1 << 20) max = 1 << 20;
    for (int fd = 4; fd < max; fd++) close(fd);
    return keep;
}

typedef struct {
    int from, to;
    unsigned char *buf;
    size_t cap, len, off;
    int eof;                 /* `from` gave EOF (or failed): nothing more to read */
    int done;                /* EOF passed on (shutdown of `to`), or `to` failed */
} Pipe;

/* Move what can move without blocking, given what poll() said about each end. */
static void pump(Pipe *p, short from_ev, short to_ev) {
    if (p->done) return;
    if (p->len > p->off && (to_ev & (POLLOUT | POLLERR | POLLHUP))) {
        ssize_t w = write(p->to, p->buf + p->off, p->len - p->off);
        if (w > 0) { p->off += (size_t)w; if (p->off == p->len) p->off = p->len = 0; }
        else if (w < 0 && errno != EAGAIN && errno != EINTR) { p->done = 1; return; } /* the reader is gone */
    }
    if (!p->eof && p->len == 0 && (from_ev & (POLLIN | POLLHUP | POLLERR))) {
        ssize_t r = read(p->from, p->buf, p->cap);
        if (r > 0) {
            p->len = (size_t)r;
            ssize_t w = write(p->to, p->buf, p->len); /* usually there is room: save a poll round */
            if (w > 0) { p->off = (size_t)w; if (p->off == p->len) p->off = p->len = 0; }
            else if (w < 0 && errno != EAGAIN && errno != EINTR) { p->done = 1; return; }
        } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) p->eof = 1;
    }
    if (p->eof && p->len == p->off) { shutdown(p->to, SHUT_WR); p->done = 1; } /* half-close, passed on */
}

/* The tunnel child: connect, answer 't' or 'E', then copy bytes both ways until both directions
 * are done. `early` is what the client sent behind its 'T' frame (already read by the keeper). */
static void run_tunnel(int client, unsigned port, const unsigned char *early, size_t early_len) {
    int target = connect_loopback(AF_INET, port);
    if (target < 0 && errno == ECONNREFUSED) {
        int fd6 = connect_loopback(AF_INET6, port); /* a server on ::1 only (Node's "localhost") */
        if (fd6 >= 0) target = fd6; else errno = ECONNREFUSED; /* no IPv6 at all says nothing new */
    }
    if (target < 0) {
        char msg[160];
        if (errno == ECONNREFUSED) snprintf(msg, sizeof msg, "nothing is listening on port %u in this environment", port);
        else snprintf(msg, sizeof msg, "cannot connect to port %u in this environment: %s", port, strerror(errno));
        write_frame_fd(client, 'E', msg);
        _exit(1);
    }
    set_nonblock(target);
    set_nonblock(client);
    write_frame_fd(client, 't', NULL);
    Pipe up = {.from = client, .to = target, .cap = early_len > TUNNEL_BUF ? early_len : TUNNEL_BUF};
    Pipe down = {.from = target, .to = client, .cap = TUNNEL_BUF};
    up.buf = malloc(up.cap);
    down.buf = malloc(down.cap);
    if (!up.buf || !down.buf) _exit(1);
    memcpy(up.buf, early, early_len);
    up.len = early_len;
    while (!(up.done && down.done)) {
        struct pollfd p[2] = {{.fd = client}, {.fd = target}};
        if (!up.done && !up.eof && up.len == 0) p[0].events |= POLLIN;
        if (!down.done && down.len > down.off) p[0].events |= POLLOUT;
        if (!down.done && !down.eof && down.len == 0) p[1].events |= POLLIN;
        if (!up.done && up.len > up.off) p[1].events |= POLLOUT;
        /* An end we wait for nothing on is left out: a hung-up socket would wake poll() at once, forever. */
        for (int i = 0; i < 2; i++) if (!p[i].events) p[i].fd = -1;
        if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; _exit(1); }
        pump(&up, p[0].revents, p[1].revents);
        pump(&down, p[1].revents, p[0].revents);
        /* POLLHUP: that socket is shut both ways (the client closed, the service reset): nothing more
         * can be written to it, so that direction is over even if it had nothing to say; the other
         * direction still passes on what was sent, then the EOF. */
        if (p[0].revents & POLLHUP) down.done = 1;
        if (p[1].revents & POLLHUP) up.done = 1;
    }
    _exit(0);
}

static void handle_tunnel(Client *c, unsigned char *payload, size_t n) {
    unsigned port = 0;
    int ok = n >= 1 && n <= 5;
    for (size_t i = 0; ok && i < n; i++) {
        if (payload[i] < '0' || payload[i] > '9') ok = 0;
        else port = port * 10 + (unsigned)(payload[i] - '0');
    }
    if (!ok || port < 1 || port > 65535) { put_text(c, 'E', "bad port"); c->closing = 1; return; }
    /* Bytes the client sent right behind the request are in our buffer: they belong to the tunnel. */
    const unsigned char *early = payload + n;
    size_t early_len = (size_t)(c->inb + c->in_len - early);
    pid_t pid = fork();
    if (pid < 0) { put_text(c, 'E', "fork failed"); c->closing = 1; return; }
    if (pid == 0) {
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        sigemptyset(&dfl.sa_mask);
        sigaction(SIGCHLD, &dfl, NULL); sigaction(SIGTERM, &dfl, NULL); sigaction(SIGINT, &dfl, NULL);
        signal(SIGPIPE, SIG_IGN); /* a write to a vanished peer is an error to handle, not a death */
        run_tunnel(close_all_but(c->fd), port, early, early_len);
    }
    /* The child has the connection now: drop ours without a shutdown (that would end the child's too),
     * and do not parse what follows the request. reap_children ignores pids that are not sessions. */
    c->closing = 2;
}

/* The container's TCP sockets as the kernel lists them (this process is in its network namespace). */
static void handle_netstat(Client *c) {
    char *text = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&text, &size);
    if (!f) { c->closing = 1; return; }
    const char *files[2] = {"/proc/net/tcp", "/proc/net/tcp6"};
    char buf[8192];
    for (int i = 0; i < 2; i++) {
        FILE *in = fopen(files[i], "r"); /* tcp6 is missing without IPv6 */
        if (!in) continue;
        size_t r;
        while ((r = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, r, f);
        fclose(in);
    }
    fclose(f);
    put_frame(c, 'n', text, size);
    free(text);
    c->closing = 1;
}

static void handle_frame(Client *c, unsigned char type, unsigned char *payload, size_t n) {
    Session *s = c->session;
    if (!s) {
        if (type == 'O') { handle_open(c, payload, n); return; }
        if (type == 'L') { handle_list(c); return; }
        if (type == 'T') { handle_tunnel(c, payload, n); return; }
        if (type == 'N') { handle_netstat(c); return; }
        if (type == 'K' || type == 'F') {
            char id[65];
            if (n == 0 || n > 64) { put_text(c, 'E', "bad id"); c->closing = 1; return; }
            memcpy(id, payload, n);
            id[n] = 0;
            Session *t = find_session(id);
            if (!t) { put_text(c, 'E', "no such session"); c->closing = 1; return; }
            if (type == 'K') kill_session(t);
            else if (t->exited) free_session(t);
            put_frame(c, type == 'K' ? 'k' : 'f', NULL, 0);
            c->closing = 1;
            return;
        }
        put_text(c, 'E', "expected O, L, K, F, T or N");
        c->closing = 1;
        return;
    }
    switch (type) {
    case 'I': handle_input(s, payload, n); break;
    case 'R':
        if (n == 4) {
            unsigned cols = ((unsigned)payload[0] << 8) | payload[1], rows = ((unsigned)payload[2] << 8) | payload[3];
            if (cols >= 2 && rows >= 2 && s->master >= 0) {
                struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
                ioctl(s->master, TIOCSWINSZ, &ws);
                s->cols = cols; s->rows = rows;
            }
        }
        break;
    case 'K': kill_session(s); break;
    case 'P': put_frame(c, 'p', payload, n); break; /* ping: echoes, so a server can time the path */
    default: break;
    }
}

static void read_client(Client *c) {
    if (c->in_cap - c->in_len < 65536) {
        size_t cap = c->in_cap ? c->in_cap * 2 : 131072;
        if (cap > MAX_FRAME + 65536 + 5) cap = MAX_FRAME + 65536 + 5;
        if (cap > c->in_cap) {
            unsigned char *p = realloc(c->inb, cap);
            if (!p) { c->closing = 1; return; }
            c->inb = p; c->in_cap = cap;
        }
    }
    ssize_t r = read(c->fd, c->inb + c->in_len, c->in_cap - c->in_len);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        /* the server went away: the session stays, unattached */
        if (c->session && c->session->attached == c) c->session->attached = NULL;
        c->session = NULL;
        c->closing = 2;
        return;
    }
    if (r < 0) return;
    c->in_len += (size_t)r;
    size_t off = 0;
    while (c->in_len - off >= 5 && !c->closing) {
        unsigned char *p = c->inb + off;
        size_t n = ((size_t)p[1] << 24) | ((size_t)p[2] << 16) | ((size_t)p[3] << 8) | p[4];
        if (n > MAX_FRAME) { put_text(c, 'E', "frame too large"); c->closing = 1; break; }
        if (c->in_len - off < 5 + n) break;
        handle_frame(c, p[0], p + 5, n);
        off += 5 + n;
    }
    memmove(c->inb, c->inb + off, c->in_len - off);
    c->in_len -= off;
}

static void write_client(Client *c) {
    fill_data(c);
    while (pending_out(c)) {
        ssize_t w = write(c->fd, c->outb + c->out_off, pending_out(c));
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) { c->closing = 2; }
            return;
        }
        c->out_off += (size_t)w;
        fill_data(c);
    }
}

static void read_master(Session *s) {
    unsigned char buf[65536];
    for (;;) {
        ssize_t r = read(s->master, buf, sizeof buf);
        if (r > 0) {
            ring_append(s, buf, (size_t)r);
            if ((size_t)r < sizeof buf) return;
            /* keep unsent output in the ring: an attached server gets every byte */
            if (s->attached && !s->exited && s->total - s->attached->sent >= s->cap / 2) return;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        /* EOF or EIO: every holder of the slave side is gone */
        s->drained = 1;
        close(s->master);
        s->master = -1;
        return;
    }
}

static void reap_children(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) return;
        for (int i = 0; i < MAX_SESSIONS; i++) {
            Session *s = &sessions[i];
            if (s->used && s->pid == pid && !s->exited) {
                s->exited = 1;
                s->status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                s->ended_at_ms = now_ms();
                s->kill_at_ms = 0;
                /* What the shell wrote before it exited is still in the PTY: read it now. */
                if (s->master >= 0) read_master(s);
                /* Background jobs may hold the PTY open; the terminal closes with its shell. */
                if (s->master >= 0) { kill(-s->pid, SIGHUP); close(s->master); s->master = -1; }
                s->drained = 1;
            }
        }
    }
}

/* ---- serve ----------------------------------------------------------------------------- */

static int listen_on(const char *path) {
    char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (strlen(path) >= sizeof dir) { fprintf(stderr, "lsl-keeper: socket path too long\n"); return -1; }
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    struct stat st = {0};
    if (slash && slash != dir) {
        *slash = 0;
        if (mkdir(dir, 0700) < 0 && errno != EEXIST) { perror("lsl-keeper: mkdir"); return -1; }
        stat(dir, &st);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("lsl-keeper: socket"); return -1; }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    unlink(path);
    mode_t old = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
    umask(old);
    if (rc < 0) { perror("lsl-keeper: bind"); close(fd); return -1; }
    /* The socket belongs to whoever owns its directory: on a bind mount, the LSL server's user on
     * the host. Container users other than root are refused below (peer_allowed). */
    if (st.st_uid != 0 && chown(path, st.st_uid, st.st_gid) < 0) perror("lsl-keeper: chown");
    if (listen(fd, 64) < 0) { perror("lsl-keeper: listen"); close(fd); return -1; }
    set_nonblock(fd);
    return fd;
}

/* Root in the container, or a process outside the container's PID namespace (the LSL server on the
 * host, whose pid the kernel reports as 0 here). A plain user in the container must not be able to
 * take over, or type into, another session's shell. */
static int peer_allowed(int fd) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return 0;
    return cred.uid == 0 || cred.pid == 0;
}

static int serve(const char *path) {
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) { perror("lsl-keeper: pipe"); return 1; }
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    for (int i = 0; i < MAX_SESSIONS; i++) sessions[i].master = -1;
    int lfd = listen_on(path);
    if (lfd < 0) return 1;
    printf("LSL-KEEPER ready version=%s socket=%s\n", KEEPER_VERSION, path);
    fflush(stdout);

    static struct pollfd fds[1 + 1 + MAX_SESSIONS + MAX_CLIENTS];
    static void *owners[1 + 1 + MAX_SESSIONS + MAX_CLIENTS];
    int stopping = 0;
    long long stop_deadline = 0;
    for (;;) {
        int n = 0;
        fds[n] = (struct pollfd){.fd = sig_pipe[0], .events = POLLIN}; owners[n++] = NULL;
        fds[n] = (struct pollfd){.fd = stopping ? -1 : lfd, .events = POLLIN}; owners[n++] = NULL;
        int live = 0;
        long long now = now_ms();
        int timeout = 1000;
        for (int i = 0; i < MAX_SESSIONS; i++) {
            Session *s = &sessions[i];
            if (!s->used) continue;
            if (s->kill_at_ms && now >= s->kill_at_ms && !s->exited) { kill(-s->pid, SIGKILL); kill(s->pid, SIGKILL); s->kill_at_ms = 0; }
            if (s->kill_at_ms) { long long left = s->kill_at_ms - now; if (left < timeout) timeout = (int)(left > 0 ? left : 0); }
            if (s->exited && !s->attached && now - s->ended_at_ms > EXITED_KEEP_MS) { free_session(s); continue; }
            if (!s->exited) live++;
            if (s->master < 0) continue;
            short ev = 0;
            /* Back-pressure: with a server attached, read no more than it can take; unattached,
             * keep reading (the shell must not block while its server restarts), into the ring. */
            Client *c = s->attached;
            if (!c || s->total - c->sent < s->cap / 2) ev |= POLLIN;
            if (s->in_len) ev |= POLLOUT;
            fds[n] = (struct pollfd){.fd = s->master, .events = ev}; owners[n++] = s;
        }
        if (stopping && (live == 0 || now >= stop_deadline)) return 0;
        for (int i = 0; i < MAX_CLIENTS; i++) {
            Client *c = &clients[i];
            if (!c->used) continue;
            if (c->closing == 2 || (c->closing && !pending_out(c))) { close_client(c); continue; }
            fill_data(c);
            short ev = c->closing ? 0 : POLLIN;
            if (pending_out(c)) ev |= POLLOUT;
            fds[n] = (struct pollfd){.fd = c->fd, .events = ev}; owners[n++] = c;
        }
        int rc = poll(fds, (nfds_t)n, timeout);
        if (rc < 0) { if (errno == EINTR) continue; perror("lsl-keeper: poll"); return 1; }
        if (fds[0].revents & POLLIN) {
            unsigned char sigs[64];
            ssize_t got = read(sig_pipe[0], sigs, sizeof sigs);
            for (ssize_t k = 0; k < got; k++) {
                if (sigs[k] == SIGTERM || sigs[k] == SIGINT) {
                    /* The container is stopping: hang up every shell, give them a moment. */
                    stopping = 1;
                    stop_deadline = now_ms() + 3000;
                    for (int i = 0; i < MAX_SESSIONS; i++) if (sessions[i].used) kill_session(&sessions[i]);
                }
            }
            reap_children();
        }
        if (!stopping && (fds[1].revents & POLLIN)) {
            for (;;) {
                int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) break;
                if (!peer_allowed(cfd)) { close(cfd); continue; }
                int slot = -1;
                for (int i = 0; i < MAX_CLIENTS; i++) if (!clients[i].used) { slot = i; break; }
                if (slot < 0) { close(cfd); continue; }
                memset(&clients[slot], 0, sizeof clients[slot]);
                clients[slot].used = 1;
                clients[slot].fd = cfd;
            }
        }
        for (int k = 2; k < n; k++) {
            if (!fds[k].revents || !owners[k]) continue;
            void *o = owners[k];
            if (o >= (void *)sessions && o < (void *)(sessions + MAX_SESSIONS)) {
                Session *s = o;
                if (!s->used) continue;
                if (fds[k].revents & POLLOUT) write_input(s);
                if (s->master >= 0 && (fds[k].revents & (POLLIN | POLLHUP | POLLERR))) read_master(s);
                if (s->attached) write_client(s->attached);
            } else {
                Client *c = o;
                if (!c->used) continue;
                if (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) read_client(c);
                if (c->used && c->closing != 2 && (fds[k].revents & POLLOUT || pending_out(c))) write_client(c);
            }
        }
    }
}

/* ---- attach: the relay a server uses through `docker exec` -------------------------------- */

static int attach(const char *path) {
    signal(SIGPIPE, SIG_IGN);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "lsl-keeper: cannot reach the keeper at %s: %s\n", path, strerror(errno));
        return 2;
    }
    struct termios tio;
    if (isatty(0) && tcgetattr(0, &tio) == 0) { cfmakeraw(&tio); tcsetattr(0, TCSANOW, &tio); }
    /* Tell the server the relay is ready (raw mode is on): before this, a TTY would mangle bytes. */
    unsigned char ready[5] = {'r', 0, 0, 0, 0};
    if (write(1, ready, 5) != 5) return 1;
    struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
    unsigned char buf[65536];
    for (;;) {
        if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; return 1; }
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t r = read(p[i].fd, buf, sizeof buf);
            if (r <= 0) return 0;
            int out = i == 0 ? fd : 1;
            for (ssize_t off = 0; off < r;) {
                ssize_t w = write(out, buf + off, (size_t)(r - off));
                if (w < 0) { if (errno == EINTR) continue; return 0; }
                off += w;
            }
        }
    }
}

int main(int argc, char **argv) {
    const char *path = DEFAULT_SOCKET;
    if (argc < 2) { fprintf(stderr, "usage: lsl-keeper serve|attach|version [--socket PATH] [--ring BYTES]\n"); return 2; }
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--socket") && i + 1 < argc) path = argv[++i];
        else if (!strcmp(argv[i], "--ring") && i + 1 < argc) {
            ring_cap = (size_t)strtoull(argv[++i], NULL, 10);
            if (ring_cap < 4096) ring_cap = 4096;
        } else { fprintf(stderr, "lsl-keeper: unknown argument %s\n", argv[i]); return 2; }
    }
    if (!strcmp(argv[1], "serve")) return serve(path);
    if (!strcmp(argv[1], "attach")) return attach(path);
    if (!strcmp(argv[1], "version")) { printf("lsl-keeper %s\n", KEEPER_VERSION); return 0; }
    fprintf(stderr, "lsl-keeper: unknown command %s\n", argv[1]);
    return 2;
}
