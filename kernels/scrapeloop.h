/* The native scraper's thread: keep-alive HTTP/1.1 GETs of many endpoints' metrics pages
 * over POSIX sockets and one epoll, each page scanned for the sample lines kvsched reads
 * (promscan.h, the scan promlines.pyx runs too) and handed to Python as those lines only.
 *
 * Why a thread of its own. On the event loop a scrape of a 62 KB vLLM page cost 75-81 us of
 * CPU at 1,000 endpoints: the transport's reads into Python buffers, the protocol callbacks,
 * a bytes copy of the page, the scan, the schedule (py-spy over kvsched bench scrape). Here
 * the socket calls, the HTTP framing and the scan run without the GIL, and Python sees one
 * wake-up for every page finished since the last (a batch), not one per read.
 *
 * What it speaks is what page_client.py speaks: HTTP/1.1 and 1.0 responses framed by
 * Content-Length, chunked transfer coding, or the connection's end; "Connection: close"
 * honoured; one request at a time per connection; a request sent on a kept-alive connection
 * that the server had closed while it was idle is sent once more on a new connection. A
 * status other than 200, a compressed body, a page over the size limit, a reset, a short
 * read or bytes past the page end fail that scrape with a sentence, and the connection is
 * made again on the next fetch. Timeouts are the caller's: it aborts a request by its
 * sequence number.
 *
 * Threading. Python calls the scrapeloop_* functions under the GIL from the event loop's
 * thread; they only take the lock and write the wake eventfd. The thread owns every target
 * and socket. Finished scrapes go to a result list under the lock, and the notify eventfd,
 * which the event loop watches, is written SCRAPELOOP_COALESCE_NS after the first of them.
 */
#ifndef KVSCHED_SCRAPELOOP_H
#define KVSCHED_SCRAPELOOP_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "promscan.h"

#define SCRAPELOOP_HEAD_LIMIT (64 * 1024)
#define SCRAPELOOP_INITIAL_BUFFER (128 * 1024)
#define SCRAPELOOP_WAKE_KEY UINT64_MAX
#define SCRAPELOOP_THREAD_NAME "kvsched-scrape"
/* How long a finished page may wait before Python is woken for it, so that one wake-up takes
 * many: at 1,000 endpoints every 0.1 s, 10,000 pages a second arrive ~20 to a wake-up instead
 * of one or two, and a figure 2 ms late is 2% of the interval it is scraped at. */
#define SCRAPELOOP_COALESCE_NS 2000000

enum { SL_OK = 0, SL_ERROR = 1 };
enum { SL_MARK_VLLM = 1, SL_MARK_SGLANG = 2 };
enum { SL_IDLE, SL_CONNECTING, SL_HEAD, SL_LENGTH, SL_CHUNKED, SL_EOF };
enum { SL_CMD_ADD, SL_CMD_FETCH, SL_CMD_ABORT, SL_CMD_REMOVE, SL_CMD_MAX_BODY, SL_CMD_STOP };

typedef struct {
    int kind;
    int64_t id;
    uint64_t seq;
    size_t size;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *request; /* ADD: owned, handed to the target */
    size_t request_len;
    char *where; /* ADD: "host:port" for error messages, owned */
} sl_command;

/* One finished scrape. OK: `data` is the page's sample lines, each as a 1-byte name index,
 * a 4-byte length (native order) and the line; `unchanged` when they are byte for byte the
 * same as that target's previous page's (data is then NULL). ERROR: `data` is the reason. */
typedef struct {
    int64_t id;
    uint64_t seq;
    int status;
    int marks;
    int unchanged;
    size_t page_bytes;
    char *data;
    size_t size;
} sl_result;

typedef struct sl_target {
    int64_t id;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *request;
    size_t request_len;
    char *where;
    int fd;
    int state;
    uint64_t seq; /* of the request in flight */
    int in_flight;
    int reused, retried, keep_alive;
    size_t sent;
    unsigned char *buf;
    size_t cap, filled, body_start, body_end, scan, out;
    /* the last page's lines, to say "unchanged" instead of handing them over again */
    unsigned char *prev;
    size_t prev_len;
    int prev_marks;
    int has_prev;
    struct sl_target *next_free;
} sl_target;

typedef struct {
    unsigned char *data;
    size_t len, cap;
    int failed;
} sl_bytes;

typedef struct {
    pthread_t thread;
    int started;
    int epoll_fd;
    int wake_fd;
    int notify_fd;
    pthread_mutex_t lock; /* commands and results */
    sl_command *commands;
    size_t n_commands, cap_commands;
    sl_result *results;
    size_t n_results, cap_results;
    int notified; /* notify_fd written since Python's last drain */
    int64_t unannounced_since; /* the thread's: when the oldest result Python was not told of came */
    /* the thread's own */
    sl_target **targets; /* by id: ids are small integers handed out by the caller */
    size_t n_targets;
    size_t max_body;
    promscan_names names;
    unsigned char *name_store;
    int want_marks; /* 0: none; 1: "vllm:" then "sglang:" (engine auto) */
    sl_bytes lines;
    int stopping;
} scrapeloop;

static void sl_bytes_put(sl_bytes *b, const void *data, size_t len) {
    if (b->failed) return;
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + len) cap *= 2;
        unsigned char *grown = (unsigned char *)realloc(b->data, cap);
        if (grown == NULL) {
            b->failed = 1;
            return;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void sl_line_hit(void *context, int which, const unsigned char *line, size_t size) {
    sl_bytes *b = (sl_bytes *)context;
    unsigned char index = (unsigned char)which;
    uint32_t len = (uint32_t)size;
    sl_bytes_put(b, &index, 1);
    sl_bytes_put(b, &len, 4);
    sl_bytes_put(b, line, size);
}

/* --- results (thread side) ------------------------------------------------------------- */

static int64_t sl_now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static void sl_push(scrapeloop *loop, sl_result *result) {
    pthread_mutex_lock(&loop->lock);
    if (loop->n_results == loop->cap_results) {
        size_t cap = loop->cap_results ? loop->cap_results * 2 : 256;
        sl_result *grown = (sl_result *)realloc(loop->results, cap * sizeof(sl_result));
        if (grown == NULL) { /* out of memory: the scrape is lost; its caller times it out */
            pthread_mutex_unlock(&loop->lock);
            free(result->data);
            return;
        }
        loop->results = grown;
        loop->cap_results = cap;
    }
    loop->results[loop->n_results++] = *result;
    pthread_mutex_unlock(&loop->lock);
    if (loop->unannounced_since == 0) loop->unannounced_since = sl_now_ns();
}

/* Python is told (notify_fd) about results once the oldest it has not been told about is
 * SCRAPELOOP_COALESCE_NS old: each wake-up of the event loop then takes every page finished
 * in that window. Returns the epoll timeout (ms) until the next announcement is due, -1 for
 * none. */
static int sl_announce(scrapeloop *loop) {
    if (loop->unannounced_since == 0) return -1;
    int64_t due = loop->unannounced_since + SCRAPELOOP_COALESCE_NS - sl_now_ns();
    if (due > 0) return (int)((due + 999999) / 1000000);
    loop->unannounced_since = 0;
    pthread_mutex_lock(&loop->lock);
    int notify = !loop->notified && loop->n_results > 0;
    if (notify) loop->notified = 1;
    pthread_mutex_unlock(&loop->lock);
    if (notify) {
        uint64_t one = 1;
        ssize_t written = write(loop->notify_fd, &one, sizeof one);
        (void)written;
    }
    return -1;
}

static void sl_close_fd(scrapeloop *loop, sl_target *t) {
    if (t->fd >= 0) {
        epoll_ctl(loop->epoll_fd, EPOLL_CTL_DEL, t->fd, NULL);
        close(t->fd);
        t->fd = -1;
    }
}

static void sl_fail(scrapeloop *loop, sl_target *t, const char *fmt, const char *detail) {
    sl_close_fd(loop, t);
    int was = t->in_flight;
    t->in_flight = 0;
    t->state = SL_IDLE;
    if (!was) return;
    char message[512];
    snprintf(message, sizeof message, fmt, detail ? detail : "");
    sl_result r = {0};
    r.id = t->id;
    r.seq = t->seq;
    r.status = SL_ERROR;
    r.size = strlen(message);
    r.data = strdup(message);
    sl_push(loop, &r);
}

/* sl_fail quoting at most `limit` (<= 100) bytes of what the endpoint sent. */
static void sl_fail_quoting(scrapeloop *loop, sl_target *t, const char *fmt, const char *text, size_t len,
                            size_t limit) {
    char shown[101];
    size_t k = len < limit ? len : limit;
    memcpy(shown, text, k);
    shown[k] = 0;
    sl_fail(loop, t, fmt, shown);
}

static void sl_done(scrapeloop *loop, sl_target *t, const unsigned char *page, size_t size) {
    sl_bytes *lines = &loop->lines;
    lines->len = 0;
    lines->failed = 0;
    promscan_lines(&loop->names, page, size, sl_line_hit, lines);
    int marks = 0;
    if (loop->want_marks) {
        /* MetricsSpec.resolve for engine "auto": "vllm:" anywhere on the page, else "sglang:". */
        if (memmem(page, size, "vllm:", 5) != NULL)
            marks = SL_MARK_VLLM;
        else if (memmem(page, size, "sglang:", 7) != NULL)
            marks = SL_MARK_SGLANG;
    }
    t->in_flight = 0;
    t->state = SL_IDLE;
    if (!t->keep_alive) sl_close_fd(loop, t);
    if (lines->failed) {
        t->in_flight = 1;
        sl_fail(loop, t, "out of memory scanning the page%s", NULL);
        return;
    }
    sl_result r = {0};
    r.id = t->id;
    r.seq = t->seq;
    r.status = SL_OK;
    r.marks = marks;
    r.page_bytes = size;
    if (t->has_prev && t->prev_marks == marks && t->prev_len == lines->len &&
        memcmp(t->prev, lines->data, lines->len) == 0) {
        r.unchanged = 1;
    } else {
        r.data = (char *)malloc(lines->len ? lines->len : 1);
        unsigned char *prev = (unsigned char *)realloc(t->prev, lines->len ? lines->len : 1);
        if (r.data == NULL || prev == NULL) {
            free(r.data);
            if (prev != NULL) t->prev = prev;
            t->has_prev = 0;
            t->in_flight = 1;
            sl_fail(loop, t, "out of memory keeping the page's lines%s", NULL);
            return;
        }
        memcpy(r.data, lines->data, lines->len);
        r.size = lines->len;
        t->prev = prev;
        memcpy(t->prev, lines->data, lines->len);
        t->prev_len = lines->len;
        t->prev_marks = marks;
        t->has_prev = 1;
    }
    sl_push(loop, &r);
}

/* --- HTTP ------------------------------------------------------------------------------ */

static int sl_send(scrapeloop *loop, sl_target *t) {
    while (t->sent < t->request_len) {
        ssize_t n = send(t->fd, t->request + t->sent, t->request_len - t->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)t->id};
                epoll_ctl(loop->epoll_fd, EPOLL_CTL_MOD, t->fd, &ev);
                return 0;
            }
            return -1;
        }
        t->sent += (size_t)n;
    }
    return 0;
}

static void sl_begin(scrapeloop *loop, sl_target *t);

static void sl_connect(scrapeloop *loop, sl_target *t) {
    int fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        sl_fail(loop, t, "cannot open a socket: %s", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    t->fd = fd;
    t->reused = 0;
    t->keep_alive = 1;
    t->state = SL_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)t->id};
    if (epoll_ctl(loop->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        sl_fail(loop, t, "cannot watch a socket: %s", strerror(errno));
        return;
    }
    if (connect(fd, (struct sockaddr *)&t->addr, t->addrlen) < 0 && errno != EINPROGRESS) {
        char detail[300];
        snprintf(detail, sizeof detail, "%s: %s", t->where, strerror(errno));
        sl_fail(loop, t, "cannot connect to %s", detail);
    }
}

static void sl_begin(scrapeloop *loop, sl_target *t) {
    t->filled = 0;
    t->scan = 0;
    t->sent = 0;
    if (t->fd < 0) {
        sl_connect(loop, t);
        return;
    }
    t->reused = 1;
    t->state = SL_HEAD;
    if (sl_send(loop, t) < 0) sl_fail(loop, t, "cannot send the request: %s", strerror(errno));
}

static int sl_header_is(const char *line, size_t len, const char *name) {
    size_t n = strlen(name);
    return len > n && line[n] == ':' && strncasecmp(line, name, n) == 0;
}

static void sl_trim(const char **value, size_t *len) {
    while (*len && (**value == ' ' || **value == '\t')) (*value)++, (*len)--;
    while (*len && ((*value)[*len - 1] == ' ' || (*value)[*len - 1] == '\t')) (*len)--;
}

static int sl_contains_ci(const char *text, size_t len, const char *word) {
    size_t n = strlen(word);
    for (size_t i = 0; i + n <= len; i++)
        if (strncasecmp(text + i, word, n) == 0) return 1;
    return 0;
}

static void sl_read_body(scrapeloop *loop, sl_target *t);

static void sl_read_head(scrapeloop *loop, sl_target *t) {
    size_t from = t->scan > 3 ? t->scan - 3 : 0;
    const unsigned char *end = (const unsigned char *)memmem(t->buf + from, t->filled - from, "\r\n\r\n", 4);
    if (end == NULL) {
        t->scan = t->filled;
        if (t->filled > SCRAPELOOP_HEAD_LIMIT)
            sl_fail(loop, t, "response head longer than 65536 bytes%s", NULL);
        return;
    }
    const char *head = (const char *)t->buf;
    size_t head_len = (size_t)(end - t->buf);
    const char *eol = (const char *)memmem(head, head_len, "\r\n", 2);
    size_t status_len = eol ? (size_t)(eol - head) : head_len;
    char status_line[101];
    size_t shown = status_len < 100 ? status_len : 100;
    memcpy(status_line, head, shown);
    status_line[shown] = 0;
    /* "HTTP/1.x NNN ..." */
    if (status_len < 12 || memcmp(head, "HTTP/1.", 7) != 0 || head[8] != ' ' || head[9] < '0' ||
        head[9] > '9' || head[10] < '0' || head[10] > '9' || head[11] < '0' || head[11] > '9' ||
        (status_len > 12 && head[12] != ' ')) {
        sl_fail(loop, t, "not an HTTP/1.x response: '%s'", status_line);
        return;
    }
    int http11 = head[7] == '1';
    long length = -1;
    int chunked = 0, close_after = 0;
    const char *line = eol ? eol + 2 : head + head_len;
    while (line < head + head_len) {
        const char *next = (const char *)memmem(line, (size_t)(head + head_len - line), "\r\n", 2);
        size_t len = next ? (size_t)(next - line) : (size_t)(head + head_len - line);
        const char *colon = (const char *)memchr(line, ':', len);
        if (colon == NULL) {
            sl_fail_quoting(loop, t, "malformed header line '%s'", line, len, 100);
            return;
        }
        const char *value = colon + 1;
        size_t value_len = len - (size_t)(value - line);
        sl_trim(&value, &value_len);
        if (sl_header_is(line, len, "content-length")) {
            length = 0;
            if (value_len == 0 || value_len > 18) length = -2;
            for (size_t i = 0; i < value_len && length >= 0; i++) {
                if (value[i] < '0' || value[i] > '9') length = -2;
                else length = length * 10 + (value[i] - '0');
            }
            if (length == -2) {
                sl_fail(loop, t, "bad Content-Length%s", NULL);
                return;
            }
        } else if (sl_header_is(line, len, "transfer-encoding")) {
            chunked = sl_contains_ci(value, value_len, "chunked");
        } else if (sl_header_is(line, len, "connection")) {
            close_after = value_len == 5 && strncasecmp(value, "close", 5) == 0;
        } else if (sl_header_is(line, len, "content-encoding")) {
            if (!(value_len == 0 || (value_len == 8 && strncasecmp(value, "identity", 8) == 0))) {
                sl_fail_quoting(loop, t, "unexpected Content-Encoding '%s'", value, value_len, 40);
                return;
            }
        }
        line = next ? next + 2 : head + head_len;
    }
    t->keep_alive = http11 && !close_after;
    if (memcmp(head + 9, "200", 3) != 0) {
        char code[4] = {head[9], head[10], head[11], 0};
        sl_fail(loop, t, "HTTP %s", code);
        return;
    }
    t->body_start = head_len + 4;
    if (chunked) {
        t->state = SL_CHUNKED;
        t->scan = t->body_start;
        t->out = t->body_start;
    } else if (length < 0) {
        t->keep_alive = 0;
        t->state = SL_EOF;
    } else {
        if ((size_t)length > loop->max_body) {
            char detail[64];
            snprintf(detail, sizeof detail, "%ld bytes exceeds %zu", length, loop->max_body);
            sl_fail(loop, t, "page of %s", detail);
            return;
        }
        t->body_end = t->body_start + (size_t)length;
        t->state = SL_LENGTH;
    }
    sl_read_body(loop, t);
}

static void sl_read_chunks(scrapeloop *loop, sl_target *t) {
    unsigned char *buf = t->buf;
    for (;;) {
        unsigned char *crlf = (unsigned char *)memmem(buf + t->scan, t->filled - t->scan, "\r\n", 2);
        if (crlf == NULL) break;
        size_t line_end = (size_t)(crlf - buf);
        size_t i = t->scan, size = 0;
        while (i < line_end && (buf[i] == ' ' || buf[i] == '\t')) i++;
        size_t digits = 0;
        for (; i < line_end; i++, digits++) {
            unsigned char c = buf[i];
            int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                  : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (v < 0) break;
            if (size > (SIZE_MAX >> 4)) { digits = 0; break; }
            size = size * 16 + (size_t)v;
        }
        while (i < line_end && (buf[i] == ' ' || buf[i] == '\t')) i++;
        if (digits == 0 || (i < line_end && buf[i] != ';')) {
            sl_fail(loop, t, "bad chunk size%s", NULL);
            return;
        }
        if (size == 0) {
            /* Last chunk: no trailers expected from a metrics server; the blank line ends it. */
            if (t->filled < line_end + 4) break;
            if (memcmp(buf + line_end + 2, "\r\n", 2) != 0) {
                sl_fail(loop, t, "trailers after the last chunk%s", NULL);
                return;
            }
            if (t->filled > line_end + 4) {
                sl_fail(loop, t, "bytes past the end of the page%s", NULL);
                return;
            }
            sl_done(loop, t, buf + t->body_start, t->out - t->body_start);
            return;
        }
        size_t data_end = line_end + 2 + size;
        if (data_end < line_end || t->filled < data_end + 2) break;
        /* The chunk's data moved down to the end of the body so far (decoded in place). */
        memmove(buf + t->out, buf + line_end + 2, size);
        t->out += size;
        if (t->out - t->body_start > loop->max_body) {
            char detail[32];
            snprintf(detail, sizeof detail, "%zu", loop->max_body);
            sl_fail(loop, t, "page exceeds %s bytes", detail);
            return;
        }
        t->scan = data_end + 2;
    }
    /* What is left undecoded moves down behind the body, so the buffer holds the page once. */
    size_t rest = t->filled - t->scan;
    memmove(buf + t->out, buf + t->scan, rest);
    t->filled = t->out + rest;
    t->scan = t->out;
}

static void sl_read_body(scrapeloop *loop, sl_target *t) {
    switch (t->state) {
    case SL_LENGTH:
        if (t->filled < t->body_end) return;
        if (t->filled > t->body_end) {
            sl_fail(loop, t, "bytes past the end of the page%s", NULL);
            return;
        }
        sl_done(loop, t, t->buf + t->body_start, t->body_end - t->body_start);
        return;
    case SL_CHUNKED:
        sl_read_chunks(loop, t);
        return;
    case SL_EOF:
        if (t->filled - t->body_start > loop->max_body) {
            char detail[32];
            snprintf(detail, sizeof detail, "%zu", loop->max_body);
            sl_fail(loop, t, "page exceeds %s bytes", detail);
        }
        return;
    default:
        return;
    }
}

/* The connection ended (EOF or an error) with `reason` (NULL for a clean EOF). */
static void sl_ended(scrapeloop *loop, sl_target *t, const char *reason) {
    sl_close_fd(loop, t);
    if (!t->in_flight) {
        t->state = SL_IDLE;
        return;
    }
    if (t->state == SL_EOF) {
        sl_done(loop, t, t->buf + t->body_start, t->filled - t->body_start);
        return;
    }
    if (t->state == SL_HEAD && t->filled == 0 && t->reused && !t->retried) {
        /* The server closed the idle keep-alive connection as the request went out: the
         * request never reached it. Once more, on a new connection. */
        t->retried = 1;
        sl_begin(loop, t);
        return;
    }
    if (reason != NULL) {
        sl_fail(loop, t, "connection closed before the page ended: %s", reason);
    } else {
        sl_fail(loop, t, "connection closed before the page ended%s", NULL);
    }
}

static int sl_room(scrapeloop *loop, sl_target *t) {
    if (t->cap - t->filled >= 16 * 1024) return 0;
    size_t limit = loop->max_body + SCRAPELOOP_HEAD_LIMIT;
    size_t grow = t->cap < limit - t->cap ? t->cap : (limit > t->cap ? limit - t->cap : 0);
    if (grow < 16 * 1024) grow = 16 * 1024;
    unsigned char *buf = (unsigned char *)realloc(t->buf, t->cap + grow);
    if (buf == NULL) return -1;
    t->buf = buf;
    t->cap += grow;
    return 0;
}

static void sl_readable(scrapeloop *loop, sl_target *t) {
    for (;;) {
        if (sl_room(loop, t) < 0) {
            sl_fail(loop, t, "out of memory reading the page%s", NULL);
            return;
        }
        size_t room = t->cap - t->filled;
        ssize_t n = recv(t->fd, t->buf + t->filled, room, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            sl_ended(loop, t, strerror(errno));
            return;
        }
        if (n == 0) {
            sl_ended(loop, t, NULL);
            return;
        }
        if (!t->in_flight) {
            sl_close_fd(loop, t); /* bytes with no request out: a confused server */
            t->state = SL_IDLE;
            return;
        }
        t->filled += (size_t)n;
        if (t->state == SL_HEAD) {
            sl_read_head(loop, t);
        } else {
            sl_read_body(loop, t);
        }
        if (t->fd < 0 || !t->in_flight) return;
        /* A short read emptied the socket for now; epoll (level-triggered) says when there is
         * more, which saves the recv that would only say EAGAIN. */
        if ((size_t)n < room) return;
    }
}

static void sl_event(scrapeloop *loop, sl_target *t, uint32_t events) {
    if (t->state == SL_CONNECTING) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int error = 0;
        socklen_t len = sizeof error;
        getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &error, &len);
        if (error != 0) {
            char detail[300];
            snprintf(detail, sizeof detail, "%s: %s", t->where, strerror(error));
            sl_fail(loop, t, "cannot connect to %s", detail);
            return;
        }
        t->state = SL_HEAD;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)t->id};
        epoll_ctl(loop->epoll_fd, EPOLL_CTL_MOD, t->fd, &ev);
        if (sl_send(loop, t) < 0) sl_fail(loop, t, "cannot send the request: %s", strerror(errno));
        return;
    }
    if ((events & EPOLLOUT) && t->fd >= 0) {
        if (sl_send(loop, t) < 0) {
            sl_fail(loop, t, "cannot send the request: %s", strerror(errno));
            return;
        }
        if (t->sent == t->request_len) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)t->id};
            epoll_ctl(loop->epoll_fd, EPOLL_CTL_MOD, t->fd, &ev);
        }
    }
    if ((events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && t->fd >= 0) sl_readable(loop, t);
}

/* --- commands (thread side) ------------------------------------------------------------ */

static void sl_free_target(scrapeloop *loop, sl_target *t) {
    sl_close_fd(loop, t);
    free(t->request);
    free(t->where);
    free(t->buf);
    free(t->prev);
    free(t);
}

static void sl_command_run(scrapeloop *loop, sl_command *c) {
    sl_target *t = (c->id >= 0 && (size_t)c->id < loop->n_targets) ? loop->targets[c->id] : NULL;
    switch (c->kind) {
    case SL_CMD_ADD: {
        if ((size_t)c->id >= loop->n_targets) {
            size_t n = loop->n_targets ? loop->n_targets : 64;
            while (n <= (size_t)c->id) n *= 2;
            sl_target **grown = (sl_target **)realloc(loop->targets, n * sizeof(sl_target *));
            if (grown == NULL) break;
            memset(grown + loop->n_targets, 0, (n - loop->n_targets) * sizeof(sl_target *));
            loop->targets = grown;
            loop->n_targets = n;
        }
        if (loop->targets[c->id] != NULL) sl_free_target(loop, loop->targets[c->id]);
        t = (sl_target *)calloc(1, sizeof(sl_target));
        if (t == NULL) break;
        t->id = c->id;
        t->addr = c->addr;
        t->addrlen = c->addrlen;
        t->request = c->request;
        t->request_len = c->request_len;
        t->where = c->where;
        c->request = c->where = NULL;
        t->fd = -1;
        t->cap = SCRAPELOOP_INITIAL_BUFFER;
        t->buf = (unsigned char *)malloc(t->cap);
        if (t->buf == NULL) {
            sl_free_target(loop, t);
            break;
        }
        loop->targets[c->id] = t;
        break;
    }
    case SL_CMD_FETCH:
        if (t == NULL) break;
        if (t->in_flight) break; /* the caller never sends two; a stale fetch is ignored */
        t->in_flight = 1;
        t->seq = c->seq;
        t->retried = 0;
        sl_begin(loop, t);
        break;
    case SL_CMD_ABORT:
        if (t == NULL || !t->in_flight || t->seq != c->seq) break;
        t->in_flight = 0;
        t->state = SL_IDLE;
        sl_close_fd(loop, t);
        break;
    case SL_CMD_REMOVE:
        if (t == NULL) break;
        sl_free_target(loop, t);
        loop->targets[c->id] = NULL;
        break;
    case SL_CMD_MAX_BODY:
        loop->max_body = c->size;
        break;
    case SL_CMD_STOP:
        loop->stopping = 1;
        break;
    }
    free(c->request);
    free(c->where);
}

static void *sl_main(void *arg) {
    scrapeloop *loop = (scrapeloop *)arg;
    struct epoll_event events[256];
    sl_command *batch = NULL;
    size_t cap_batch = 0;
    int timeout = -1;
    while (!loop->stopping) {
        int n = epoll_wait(loop->epoll_fd, events, 256, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < n; i++) {
            uint64_t key = events[i].data.u64;
            if (key == SCRAPELOOP_WAKE_KEY) {
                uint64_t count;
                ssize_t got = read(loop->wake_fd, &count, sizeof count);
                (void)got;
                pthread_mutex_lock(&loop->lock);
                size_t taken = loop->n_commands;
                if (taken > cap_batch) {
                    sl_command *grown = (sl_command *)realloc(batch, taken * sizeof(sl_command));
                    if (grown != NULL) {
                        batch = grown;
                        cap_batch = taken;
                    } else {
                        taken = cap_batch;
                    }
                }
                memcpy(batch, loop->commands, taken * sizeof(sl_command));
                memmove(loop->commands, loop->commands + taken, (loop->n_commands - taken) * sizeof(sl_command));
                loop->n_commands -= taken;
                pthread_mutex_unlock(&loop->lock);
                for (size_t k = 0; k < taken; k++) sl_command_run(loop, &batch[k]);
                continue;
            }
            if (key < loop->n_targets && loop->targets[key] != NULL) {
                sl_target *t = loop->targets[key];
                if (t->fd >= 0) sl_event(loop, t, events[i].events);
            }
        }
        timeout = sl_announce(loop);
    }
    free(batch);
    return NULL;
}

/* --- the caller's side (under the GIL) -------------------------------------------------- */

static int scrapeloop_command(scrapeloop *loop, sl_command *c, int wake) {
    pthread_mutex_lock(&loop->lock);
    if (loop->n_commands == loop->cap_commands) {
        size_t cap = loop->cap_commands ? loop->cap_commands * 2 : 256;
        sl_command *grown = (sl_command *)realloc(loop->commands, cap * sizeof(sl_command));
        if (grown == NULL) {
            pthread_mutex_unlock(&loop->lock);
            return -1;
        }
        loop->commands = grown;
        loop->cap_commands = cap;
    }
    loop->commands[loop->n_commands++] = *c;
    pthread_mutex_unlock(&loop->lock);
    if (wake) {
        uint64_t one = 1;
        ssize_t written = write(loop->wake_fd, &one, sizeof one);
        (void)written;
    }
    return 0;
}

static void scrapeloop_wake(scrapeloop *loop) {
    uint64_t one = 1;
    ssize_t written = write(loop->wake_fd, &one, sizeof one);
    (void)written;
}

/* Takes every finished scrape; the caller frees each result's data. */
static sl_result *scrapeloop_take(scrapeloop *loop, size_t *count) {
    uint64_t value;
    ssize_t got = read(loop->notify_fd, &value, sizeof value);
    (void)got;
    pthread_mutex_lock(&loop->lock);
    sl_result *results = loop->results;
    *count = loop->n_results;
    loop->results = NULL;
    loop->n_results = loop->cap_results = 0;
    loop->notified = 0;
    pthread_mutex_unlock(&loop->lock);
    return results;
}

static int scrapeloop_start(scrapeloop *loop, const unsigned char *const *names, const size_t *sizes,
                            int count, int want_marks, size_t max_body) {
    memset(loop, 0, sizeof *loop);
    loop->epoll_fd = loop->wake_fd = loop->notify_fd = -1;
    size_t total = 0;
    for (int k = 0; k < count; k++) total += sizes[k];
    loop->name_store = (unsigned char *)malloc(total ? total : 1);
    if (loop->name_store == NULL) return -1;
    const unsigned char *starts[PROMSCAN_MAX_NAMES];
    size_t offset = 0;
    for (int k = 0; k < count && k < PROMSCAN_MAX_NAMES; k++) {
        memcpy(loop->name_store + offset, names[k], sizes[k]);
        starts[k] = loop->name_store + offset;
        offset += sizes[k];
    }
    if (promscan_prepare(&loop->names, starts, sizes, count) < 0) return -1;
    loop->want_marks = want_marks;
    loop->max_body = max_body;
    pthread_mutex_init(&loop->lock, NULL);
    loop->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    loop->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (loop->epoll_fd < 0 || loop->wake_fd < 0 || loop->notify_fd < 0) return -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = SCRAPELOOP_WAKE_KEY};
    if (epoll_ctl(loop->epoll_fd, EPOLL_CTL_ADD, loop->wake_fd, &ev) < 0) return -1;
    if (pthread_create(&loop->thread, NULL, sl_main, loop) != 0) return -1;
    /* Named so that its CPU can be told from the event loop's (/proc/self/task/<tid>/comm). */
    pthread_setname_np(loop->thread, SCRAPELOOP_THREAD_NAME);
    loop->started = 1;
    return 0;
}

/* Stops and joins the thread, closes every socket, frees everything. */
static void scrapeloop_stop(scrapeloop *loop) {
    if (loop->started) {
        sl_command c = {0};
        c.kind = SL_CMD_STOP;
        scrapeloop_command(loop, &c, 1);
        pthread_join(loop->thread, NULL);
        loop->started = 0;
    }
    for (size_t i = 0; i < loop->n_targets; i++)
        if (loop->targets[i] != NULL) sl_free_target(loop, loop->targets[i]);
    free(loop->targets);
    loop->targets = NULL;
    loop->n_targets = 0;
    for (size_t i = 0; i < loop->n_commands; i++) {
        free(loop->commands[i].request);
        free(loop->commands[i].where);
    }
    free(loop->commands);
    loop->commands = NULL;
    loop->n_commands = loop->cap_commands = 0;
    for (size_t i = 0; i < loop->n_results; i++) free(loop->results[i].data);
    free(loop->results);
    loop->results = NULL;
    loop->n_results = loop->cap_results = 0;
    free(loop->lines.data);
    loop->lines.data = NULL;
    free(loop->name_store);
    loop->name_store = NULL;
    if (loop->epoll_fd >= 0) close(loop->epoll_fd);
    if (loop->wake_fd >= 0) close(loop->wake_fd);
    if (loop->notify_fd >= 0) close(loop->notify_fd);
    loop->epoll_fd = loop->wake_fd = loop->notify_fd = -1;
}

#endif
