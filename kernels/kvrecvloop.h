/* The KV-event receive thread: every subscription's live SUB socket drained by one native
 * thread, its messages handed to Python in one call per wake-up.
 *
 * Why a thread of its own. At 1,000 subscriptions each KV-event batch arrives on its own, and
 * on the event loop a batch cost ~47 us of CPU: about half of it pyzmq's receive of three
 * frames and libzmq's EVENTS asks, a loop wake-up and a reader callback per batch, before
 * decoding and applying (py-spy over kvsched bench scrape). Here the receives and the asks
 * run without the GIL, and Python is woken once for every message received since its last
 * take (kvrecvloop_take), not once per message.
 *
 * libzmq. The sockets are pyzmq's (Python makes them, sets their options, starts their
 * monitors and connects them), so this must call the very libzmq pyzmq loaded: its functions
 * are looked up in that library at start (dlopen with RTLD_NOLOAD of the path Python found
 * among the process's mappings) and nothing here links libzmq, whose headers need not exist.
 * The declarations below are libzmq 4.x's stable ABI (zmq.h: zmq_msg_t is 64 opaque bytes;
 * ZMQ_FD 14, ZMQ_EVENTS 15, ZMQ_POLLIN 1, ZMQ_DONTWAIT 1).
 *
 * Threading. A libzmq socket may be used by one thread at a time and handed between threads
 * with a full barrier: a socket is the thread's from its ADD command (taken under the lock)
 * until its REMOVE command is acknowledged (kvrecvloop_remove waits for that), and Python
 * touches it only outside that span. Python calls kvrecvloop_* from the event loop's thread;
 * they take the lock and write the wake eventfd. Received messages go to a byte buffer under
 * the lock, and the notify eventfd, which the event loop watches, is written at once for the
 * first message after a quiet spell and at most every KVRECV_COALESCE_NS otherwise.
 *
 * Bounds. When more than max_pending bytes wait for Python, the thread stops receiving until
 * Python takes them: what arrives meanwhile waits in each socket's own queue (its RCVHWM),
 * and past that ZMQ drops it, which ingest then sees as a sequence gap like any lost message.
 */
#ifndef KVSCHED_KVRECVLOOP_H
#define KVSCHED_KVRECVLOOP_H

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define KVRECV_THREAD_NAME "kvsched-kvrecv"
/* Wake-ups of Python at most this often while messages keep coming: at 5,000 batches a
 * second (1,000 publishers) a wake-up takes ~5 instead of one, and a batch applied 1 ms
 * late is nothing next to the prefills whose blocks it reports. */
#define KVRECV_COALESCE_NS 1000000
/* After a pass that received something, the thread waits this long from the pass's start
 * before it looks again: at 1,000 publishers each batch arrives on its own, and a wake-up of
 * the thread per batch (epoll_wait, the switch) cost more than receiving it. */
#define KVRECV_PASS_NS 500000
/* Messages received from one socket before the others get their turn. */
#define KVRECV_SLICE 64
/* Received bytes after which a pass hands what it has to Python's buffer before going on. */
#define KVRECV_PUBLISH_BYTES (1024 * 1024)
#define KVRECV_EPOLL_EVENTS 256

#define KR_ZMQ_FD 14
#define KR_ZMQ_EVENTS 15
#define KR_ZMQ_POLLIN 1
#define KR_ZMQ_DONTWAIT 1

typedef struct {
    unsigned char _[64];
} __attribute__((aligned(sizeof(void *)))) kr_msg;

typedef struct {
    int (*msg_init)(kr_msg *);
    int (*msg_recv)(kr_msg *, void *, int);
    void *(*msg_data)(kr_msg *);
    size_t (*msg_size)(const kr_msg *);
    int (*msg_more)(const kr_msg *);
    int (*msg_close)(kr_msg *);
    int (*getsockopt)(void *, int, void *, size_t *);
    int (*errno_)(void);
    void (*version)(int *, int *, int *);
} kr_zmq_api;

enum { KR_CMD_ADD, KR_CMD_REMOVE, KR_CMD_STOP };

typedef struct {
    int kind;
    int64_t id;
    void *socket;
    int fd;
    uint64_t ticket;
} kr_command;

typedef struct kr_sock {
    int64_t id;
    void *socket;
    int fd;
    int ready; /* on the ready list: its descriptor fired, or a slice ended with more to read */
} kr_sock;

typedef struct {
    unsigned char *data;
    size_t len, cap;
} kr_buf;

typedef struct {
    pthread_t thread;
    int started;
    int epoll_fd;
    int wake_fd;
    int notify_fd;
    kr_zmq_api zmq;
    pthread_mutex_t lock;
    pthread_cond_t acked;
    /* under the lock */
    kr_command *commands;
    size_t n_commands, cap_commands;
    uint64_t tickets_issued, tickets_done;
    kr_buf pending; /* records: int64 id, uint32 frame count, then per frame uint32 size + bytes */
    size_t max_pending;
    int stalled;  /* stopped receiving for max_pending; take wakes it */
    int notified; /* notify_fd written since the last take */
    uint64_t last_notify_ns;
    uint64_t messages, bytes, stalls, receive_errors, dropped_oom;
    uint64_t add_failed_ticket; /* the last ADD the thread could not carry out */
    /* the thread's own */
    kr_sock **socks;
    size_t n_socks, cap_socks;
    kr_sock **ready;
    size_t n_ready, cap_ready;
    kr_buf local;
    uint64_t local_messages;
    int stopping;
} kvrecvloop;

static uint64_t kr_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int kr_reserve(kr_buf *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64 * 1024;
    while (cap < b->len + more) cap *= 2;
    unsigned char *data = (unsigned char *)realloc(b->data, cap);
    if (data == NULL) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static void kr_signal(int fd) {
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof one);
    (void)n; /* a full eventfd counter is already readable */
}

static void kr_drain_fd(int fd) {
    uint64_t count;
    ssize_t n = read(fd, &count, sizeof count);
    (void)n;
}

/* Looks libzmq's functions up in the library at `path`, which must be loaded already. */
static int kr_bind_zmq(kr_zmq_api *api, const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) return -1;
#define KR_SYM(field, name)                                       \
    do {                                                          \
        *(void **)(&api->field) = dlsym(lib, name);               \
        if (api->field == NULL) {                                 \
            dlclose(lib);                                         \
            return -1;                                            \
        }                                                         \
    } while (0)
    KR_SYM(msg_init, "zmq_msg_init");
    KR_SYM(msg_recv, "zmq_msg_recv");
    KR_SYM(msg_data, "zmq_msg_data");
    KR_SYM(msg_size, "zmq_msg_size");
    KR_SYM(msg_more, "zmq_msg_more");
    KR_SYM(msg_close, "zmq_msg_close");
    KR_SYM(getsockopt, "zmq_getsockopt");
    KR_SYM(errno_, "zmq_errno");
    KR_SYM(version, "zmq_version");
#undef KR_SYM
    /* The handle stays open: the library stays loaded as long as pyzmq's module is anyway. */
    return 0;
}

static void kr_mark_ready(kvrecvloop *loop, kr_sock *s) {
    if (s->ready) return;
    if (loop->n_ready == loop->cap_ready) {
        size_t cap = loop->cap_ready ? 2 * loop->cap_ready : 64;
        kr_sock **ready = (kr_sock **)realloc(loop->ready, cap * sizeof *ready);
        if (ready == NULL) return; /* it is looked at again when its descriptor fires */
        loop->ready = ready;
        loop->cap_ready = cap;
    }
    loop->ready[loop->n_ready++] = s;
    s->ready = 1;
}

/* One whole message of `s` appended to the thread's buffer: 1, or 0 when none waits, -1 on
 * an error other than EAGAIN. */
static int kr_receive_one(kvrecvloop *loop, kr_sock *s) {
    kr_zmq_api *z = &loop->zmq;
    kr_msg msg;
    z->msg_init(&msg);
    if (z->msg_recv(&msg, s->socket, KR_ZMQ_DONTWAIT) < 0) {
        int err = z->errno_();
        z->msg_close(&msg);
        return err == EAGAIN ? 0 : -1;
    }
    kr_buf *b = &loop->local;
    size_t start = b->len;
    uint32_t frames = 0;
    int failed = kr_reserve(b, 12);
    if (!failed) {
        memcpy(b->data + b->len, &s->id, 8);
        b->len += 12; /* the frame count is written below */
    }
    for (;;) {
        size_t size = z->msg_size(&msg);
        if (!failed && size <= UINT32_MAX && kr_reserve(b, 4 + size) == 0) {
            uint32_t size32 = (uint32_t)size;
            memcpy(b->data + b->len, &size32, 4);
            memcpy(b->data + b->len + 4, z->msg_data(&msg), size);
            b->len += 4 + size;
            frames++;
        } else {
            failed = 1;
        }
        int more = z->msg_more(&msg);
        z->msg_close(&msg);
        if (!more) break;
        /* The rest of a multipart message is there already: ZMQ delivers it whole. */
        z->msg_init(&msg);
        if (z->msg_recv(&msg, s->socket, KR_ZMQ_DONTWAIT) < 0) {
            z->msg_close(&msg);
            break;
        }
    }
    if (failed) {
        /* Out of memory: the message is dropped, a gap ingest sees like any lost one. */
        b->len = start;
        pthread_mutex_lock(&loop->lock);
        loop->dropped_oom++;
        pthread_mutex_unlock(&loop->lock);
        return 1;
    }
    memcpy(b->data + start + 8, &frames, 4);
    loop->local_messages++;
    return 1;
}

/* Receives up to a slice of `s`'s messages; leaves it on the ready list when its queue was
 * not seen empty. As on the Python path, a wake-up almost always means a message, so it is
 * received at once and EVENTS asked only after it (each ask makes libzmq process the
 * socket's command queue, ~2 us). */
static int kr_drain_socket(kvrecvloop *loop, kr_sock *s) {
    for (int n = 0; n < KVRECV_SLICE; n++) {
        int got = kr_receive_one(loop, s);
        if (got <= 0) {
            if (got < 0) {
                pthread_mutex_lock(&loop->lock);
                loop->receive_errors++;
                pthread_mutex_unlock(&loop->lock);
            }
            return 0;
        }
        int events = 0;
        size_t len = sizeof events;
        if (loop->zmq.getsockopt(s->socket, KR_ZMQ_EVENTS, &events, &len) != 0) return 0;
        if (!(events & KR_ZMQ_POLLIN)) return 0;
        if (loop->local.len >= KVRECV_PUBLISH_BYTES) return 1;
    }
    return 1;
}

/* Moves the thread's buffer to Python's and writes the notify descriptor when it is due;
 * returns the nanoseconds until a coalesced notification is due (0: none waits). */
static uint64_t kr_publish(kvrecvloop *loop) {
    uint64_t wait_ns = 0;
    pthread_mutex_lock(&loop->lock);
    if (loop->local.len) {
        if (loop->pending.len == 0) {
            kr_buf swap = loop->pending;
            loop->pending = loop->local;
            loop->local = swap;
            loop->local.len = 0;
        } else if (kr_reserve(&loop->pending, loop->local.len) == 0) {
            memcpy(loop->pending.data + loop->pending.len, loop->local.data, loop->local.len);
            loop->pending.len += loop->local.len;
            loop->local.len = 0;
        } else {
            loop->dropped_oom += loop->local_messages;
            loop->local.len = 0;
        }
        loop->messages += loop->local_messages;
        loop->local_messages = 0;
        if (loop->pending.len >= loop->max_pending) {
            loop->stalled = 1;
            loop->stalls++;
        }
    }
    if (loop->pending.len && !loop->notified) {
        uint64_t now = kr_now_ns();
        uint64_t due = loop->last_notify_ns + KVRECV_COALESCE_NS;
        if (now >= due) {
            kr_signal(loop->notify_fd);
            loop->notified = 1;
            loop->last_notify_ns = now;
        } else {
            wait_ns = due - now;
        }
    }
    pthread_mutex_unlock(&loop->lock);
    return wait_ns;
}

static kr_sock *kr_find(kvrecvloop *loop, int64_t id, size_t *at) {
    for (size_t i = 0; i < loop->n_socks; i++)
        if (loop->socks[i]->id == id) {
            *at = i;
            return loop->socks[i];
        }
    return NULL;
}

/* Takes the socket of an ADD into the thread's watch; 0, or -1 (nothing taken). */
static int kr_add_socket(kvrecvloop *loop, const kr_command *c) {
    if (loop->n_socks == loop->cap_socks) {
        size_t cap = loop->cap_socks ? 2 * loop->cap_socks : 64;
        kr_sock **socks = (kr_sock **)realloc(loop->socks, cap * sizeof *socks);
        if (socks == NULL) return -1;
        loop->socks = socks;
        loop->cap_socks = cap;
    }
    kr_sock *s = (kr_sock *)calloc(1, sizeof *s);
    if (s == NULL) return -1;
    s->id = c->id;
    s->socket = c->socket;
    s->fd = c->fd;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.ptr = s;
    if (epoll_ctl(loop->epoll_fd, EPOLL_CTL_ADD, s->fd, &ev) != 0) {
        free(s);
        return -1;
    }
    loop->socks[loop->n_socks++] = s;
    /* ZMQ's descriptor signals changes, not levels: what arrived before it was watched is
     * looked for once now. */
    kr_mark_ready(loop, s);
    return 0;
}

static void kr_run_command(kvrecvloop *loop, const kr_command *c) {
    if (c->kind == KR_CMD_STOP) {
        loop->stopping = 1;
        return;
    }
    if (c->kind == KR_CMD_ADD) {
        if (kr_add_socket(loop, c) != 0) {
            /* Said to the caller, which waits for this command (kvrecvloop_add_failed). */
            pthread_mutex_lock(&loop->lock);
            loop->add_failed_ticket = c->ticket;
            pthread_mutex_unlock(&loop->lock);
        }
        return;
    }
    size_t at;
    kr_sock *s = kr_find(loop, c->id, &at);
    if (s == NULL) return;
    epoll_ctl(loop->epoll_fd, EPOLL_CTL_DEL, s->fd, NULL);
    loop->socks[at] = loop->socks[--loop->n_socks];
    for (size_t i = 0; i < loop->n_ready; i++)
        if (loop->ready[i] == s) {
            memmove(loop->ready + i, loop->ready + i + 1, (loop->n_ready - i - 1) * sizeof *loop->ready);
            loop->n_ready--;
            break;
        }
    free(s);
}

static void kr_run_commands(kvrecvloop *loop) {
    pthread_mutex_lock(&loop->lock);
    kr_command *commands = loop->commands;
    size_t count = loop->n_commands;
    loop->commands = NULL;
    loop->n_commands = loop->cap_commands = 0;
    pthread_mutex_unlock(&loop->lock);
    for (size_t i = 0; i < count; i++) kr_run_command(loop, &commands[i]);
    free(commands);
    if (count) {
        pthread_mutex_lock(&loop->lock);
        loop->tickets_done += count;
        pthread_cond_broadcast(&loop->acked);
        pthread_mutex_unlock(&loop->lock);
    }
}

static void *kr_main(void *arg) {
    kvrecvloop *loop = (kvrecvloop *)arg;
    struct epoll_event events[KVRECV_EPOLL_EVENTS];
    uint64_t notify_wait_ns = 0;
    uint64_t pass_started_ns = 0; /* of the last pass that received something */
    while (!loop->stopping) {
        pthread_mutex_lock(&loop->lock);
        int stalled = loop->stalled;
        pthread_mutex_unlock(&loop->lock);
        if (stalled) {
            /* Only commands and take's wake-up (the sockets' descriptors would fire on), and
             * the notification of what waits, if it was put off to coalesce. */
            struct pollfd p = {.fd = loop->wake_fd, .events = POLLIN};
            int wait_ms = notify_wait_ns ? (int)((notify_wait_ns + 999999) / 1000000) : -1;
            if (poll(&p, 1, wait_ms) > 0) kr_drain_fd(loop->wake_fd);
            kr_run_commands(loop);
            notify_wait_ns = kr_publish(loop);
            continue;
        }
        if (pass_started_ns) {
            uint64_t since = kr_now_ns() - pass_started_ns;
            if (since < KVRECV_PASS_NS) {
                struct timespec pause = {0, (long)(KVRECV_PASS_NS - since)};
                nanosleep(&pause, NULL);
            }
            pass_started_ns = 0;
        }
        int timeout_ms = -1;
        if (loop->n_ready) {
            timeout_ms = 0;
        } else if (notify_wait_ns) {
            timeout_ms = (int)((notify_wait_ns + 999999) / 1000000);
        }
        int n = epoll_wait(loop->epoll_fd, events, KVRECV_EPOLL_EVENTS, timeout_ms);
        int woken = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL) {
                woken = 1;
            } else {
                kr_mark_ready(loop, (kr_sock *)events[i].data.ptr);
            }
        }
        if (woken) {
            kr_drain_fd(loop->wake_fd);
            kr_run_commands(loop);
            if (loop->stopping) break;
        }
        /* One pass over the ready sockets; those with more to read stay for the next. */
        uint64_t received_before = loop->local_messages;
        uint64_t started_ns = kr_now_ns();
        size_t count = loop->n_ready, kept = 0;
        for (size_t i = 0; i < count; i++) {
            kr_sock *s = loop->ready[i];
            int more = 1;
            if (loop->local.len < KVRECV_PUBLISH_BYTES) more = kr_drain_socket(loop, s);
            if (more) {
                loop->ready[kept++] = s;
            } else {
                s->ready = 0;
            }
        }
        loop->n_ready = kept;
        if (loop->local_messages != received_before) pass_started_ns = started_ns;
        notify_wait_ns = kr_publish(loop);
    }
    return NULL;
}

static int kvrecvloop_command(kvrecvloop *loop, kr_command *c, uint64_t *ticket) {
    pthread_mutex_lock(&loop->lock);
    if (loop->n_commands == loop->cap_commands) {
        size_t cap = loop->cap_commands ? 2 * loop->cap_commands : 16;
        kr_command *commands = (kr_command *)realloc(loop->commands, cap * sizeof *commands);
        if (commands == NULL) {
            pthread_mutex_unlock(&loop->lock);
            return -1;
        }
        loop->commands = commands;
        loop->cap_commands = cap;
    }
    c->ticket = ++loop->tickets_issued;
    loop->commands[loop->n_commands++] = *c;
    if (ticket != NULL) *ticket = c->ticket;
    pthread_mutex_unlock(&loop->lock);
    kr_signal(loop->wake_fd);
    return 0;
}

/* Blocks until the thread has run every command up to `ticket` (call without the GIL). */
static void kvrecvloop_wait(kvrecvloop *loop, uint64_t ticket) {
    pthread_mutex_lock(&loop->lock);
    while (loop->started && loop->tickets_done < ticket) pthread_cond_wait(&loop->acked, &loop->lock);
    pthread_mutex_unlock(&loop->lock);
}

/* Python's buffer of received messages, now the caller's (free it); *len its bytes. Clears
 * the notify descriptor and lets a stalled thread receive again. */
static unsigned char *kvrecvloop_take(kvrecvloop *loop, size_t *len) {
    pthread_mutex_lock(&loop->lock);
    kr_drain_fd(loop->notify_fd);
    loop->notified = 0;
    unsigned char *data = loop->pending.data;
    *len = loop->pending.len;
    if (*len == 0) {
        data = NULL;
    } else {
        loop->pending.data = NULL;
        loop->pending.len = loop->pending.cap = 0;
    }
    int wake = loop->stalled;
    loop->stalled = 0;
    pthread_mutex_unlock(&loop->lock);
    if (wake) kr_signal(loop->wake_fd);
    return data;
}

/* Whether the ADD of `ticket`, already run (kvrecvloop_wait), failed. */
static int kvrecvloop_add_failed(kvrecvloop *loop, uint64_t ticket) {
    pthread_mutex_lock(&loop->lock);
    int failed = loop->add_failed_ticket == ticket;
    pthread_mutex_unlock(&loop->lock);
    return failed;
}

/* The totals, read under the lock the thread writes them under. */
static void kvrecvloop_stats(kvrecvloop *loop, uint64_t out[4]) {
    pthread_mutex_lock(&loop->lock);
    out[0] = loop->messages;
    out[1] = loop->stalls;
    out[2] = loop->receive_errors;
    out[3] = loop->dropped_oom;
    pthread_mutex_unlock(&loop->lock);
}

static void kvrecvloop_stop(kvrecvloop *loop);

static int kvrecvloop_start(kvrecvloop *loop, const char *libzmq_path, size_t max_pending) {
    memset(loop, 0, sizeof *loop);
    loop->epoll_fd = loop->wake_fd = loop->notify_fd = -1;
    if (kr_bind_zmq(&loop->zmq, libzmq_path) != 0) return -2;
    loop->max_pending = max_pending;
    pthread_mutex_init(&loop->lock, NULL);
    pthread_cond_init(&loop->acked, NULL);
    loop->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    loop->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (loop->epoll_fd < 0 || loop->wake_fd < 0 || loop->notify_fd < 0) return -1;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    if (epoll_ctl(loop->epoll_fd, EPOLL_CTL_ADD, loop->wake_fd, &ev) < 0) return -1;
    /* Signals stay with Python's threads: the thread starts with every one blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&loop->thread, NULL, kr_main, loop);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) return -1;
    /* Named so that its CPU can be told from the event loop's (/proc/self/task/<tid>/comm). */
    pthread_setname_np(loop->thread, KVRECV_THREAD_NAME);
    loop->started = 1;
    return 0;
}

/* Stops and joins the thread and frees everything; the sockets stay open (they are pyzmq's). */
static void kvrecvloop_stop(kvrecvloop *loop) {
    if (loop->started) {
        kr_command c;
        memset(&c, 0, sizeof c);
        c.kind = KR_CMD_STOP;
        if (kvrecvloop_command(loop, &c, NULL) == 0) pthread_join(loop->thread, NULL);
        pthread_mutex_lock(&loop->lock);
        loop->started = 0;
        pthread_cond_broadcast(&loop->acked);
        pthread_mutex_unlock(&loop->lock);
        pthread_cond_destroy(&loop->acked);
        pthread_mutex_destroy(&loop->lock);
    }
    for (size_t i = 0; i < loop->n_socks; i++) free(loop->socks[i]);
    free(loop->socks);
    free(loop->ready);
    free(loop->commands);
    free(loop->pending.data);
    free(loop->local.data);
    loop->socks = loop->ready = NULL;
    loop->commands = NULL;
    loop->pending.data = loop->local.data = NULL;
    loop->n_socks = loop->n_ready = loop->n_commands = 0;
    if (loop->epoll_fd >= 0) close(loop->epoll_fd);
    if (loop->wake_fd >= 0) close(loop->wake_fd);
    if (loop->notify_fd >= 0) close(loop->notify_fd);
    loop->epoll_fd = loop->wake_fd = loop->notify_fd = -1;
}

#endif
