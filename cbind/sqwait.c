/*
 * The shadow SQ tail poller in C (emulator/nvme/sqwait.py drives it): while
 * the event loop has nothing else to do, watch the Shadow Doorbell buffer
 * (NVMe Base 2.1 §5.1.7) of the polled I/O SQs, serve what appears with the
 * fast path (ioq_run of cbind/ioq.c, compiled into the same module), write
 * the CQ's interrupt eventfd, and return as soon as the loop has an event
 * (its epoll fd is readable), its timeout passes, or an SQ needs Python.
 *
 * Python is not running while this runs (the event loop thread is in here,
 * with the GIL released), so Python's queue state is only stale, never
 * raced: the entries carry the ring indices in and out, and Python copies
 * them back before any of its own code looks at the queues.
 *
 * An entry leaves the wait (stop != 0) when a command at its SQ head is one
 * Python must run (ioq_batch.stop), when its shadow tail is out of range, or
 * when its SQ has been empty for its idle spell (``idle_ns``): Python then
 * runs the command, or arms the SQ's EventIdx (with its barrier and
 * re-check), and decides what comes next.  A full CQ is not a stop: the
 * entry re-reads the shadow CQ head until the host frees a slot.
 *
 * Between empty turns it spins for ``spin_ns`` after the last command seen,
 * then naps in epoll_pwait2 on the loop's epoll fd, so a socket event ends
 * the nap at once (nanosleep where epoll_pwait2 is missing).  The nap is
 * ``nap_ns`` times the commands the last busy turn of an SQ served, at most
 * ``nap_max_ns``: a host that submits one command at a time (queue depth 1)
 * is answered soon, one that keeps many in flight gets its completions in
 * larger batches, one interrupt each (a natural coalescing).
 *
 * Naps for a host with one command in flight (queue depth 1): such a host takes
 * a while between a completion and its next command (a guest's interrupt, its
 * kernel and application: 200-300 us under TCG), always about as long.  Each
 * entry learns that gap (``gap_ns``, from a turn that left the SQ empty,
 * ``empty_ns``, to the next command) and the wait naps until ``early_ns``
 * before the next command is due, then spins until it comes, or until four
 * times ``early_ns`` past the due time (then the naps above).  No spin after
 * the completion, where nothing comes, and one wakeup instead of one per nap;
 * the command is found as it arrives instead of up to a nap later.  A turn
 * that finds several new commands forgets the estimate: that host keeps more
 * than one in flight.
 *
 * Interrupts: completions are signalled (an eventfd write for the CQ's
 * vector) at once when the host has consumed every completion signalled
 * before (its shadow CQ head reached ``signaled``, the CQ tail at the last
 * interrupt): a host waiting for its one command (queue depth 1) is told
 * without delay.  While the host is still working through completions it
 * was told of, new ones are held, at most ``hold_ns`` (0: never held): its interrupt
 * handler may see them in the same pass (Linux's reads on until the phase
 * tag stops matching), and if it stops short of them, the next turn finds
 * its head at ``signaled`` and signals them.  With many commands in flight
 * this gives one interrupt per pass of the host instead of one per turn;
 * the bound keeps a host that moves its head lazily from waiting long.
 */
#include <sys/epoll.h>
#include <sys/syscall.h>

/* BEGIN CDEF: the interface, also read by cbind/ioq.py */
/* One polled SQ and its CQ (the CQ has no other SQ): the fast path's batch
 * struct, host addresses of the shadow SQ tail and shadow CQ head, the
 * interrupt eventfd of the CQ's vector (written once per turn that posted). */
struct sqw_entry {
    struct ioq_batch *b;
    uint64_t shadow_tail;
    uint64_t shadow_head;
    int32_t irq_fd;
    uint32_t stop;       /* out: why it left the wait: 0 still in, SQW_* */
    uint32_t sq_head, sq_tail, cq_head, cq_tail, cq_phase; /* in and out */
    uint32_t signaled;   /* in and out: the CQ tail at the last interrupt (see above) */
    uint64_t held_ns;    /* in and out: since when completions are held, 0: none */
    uint64_t last_ns;    /* in and out: CLOCK_MONOTONIC of the last new command seen */
    uint64_t idle_ns;    /* the idle spell: empty this long, the entry leaves (SQW_IDLE) */
    uint64_t empty_ns;   /* in and out: when a turn that served left the SQ empty, 0: not so */
    uint64_t gap_ns;     /* in and out: how soon the host submits again after that (estimate) */
    uint64_t turn_bytes; /* a turn stops after this much data, signals, and the next goes on */
    uint64_t done, writes, read_bytes, write_bytes, sgls, irqs; /* out, added up */
    uint64_t lat[24];    /* out: commands per latency bucket (cmdstats.py) */
};

/* Serve and wait; ``timeout_ns`` < 0: no timeout, 0: one turn.  Returns
 * 0 timeout, 1 the epoll fd is readable (or a signal came), 2 an entry left the wait. */
int sqw_wait(struct sqw_entry *e, uint32_t n, int epfd, int64_t timeout_ns, uint64_t spin_ns,
             uint64_t nap_ns, uint64_t nap_max_ns, uint64_t hold_ns, uint64_t early_ns);
/* END CDEF */

#define SQW_IDLE 2    /* empty for the idle spell: Python arms the EventIdx */
#define SQW_SHADOW 3  /* a shadow tail or head out of range: Python decides */
#define SQW_STOP_BASE 16 /* + ioq_batch.stop: a command at the head Python runs */
#define SQW_EXPECT_MAX_NS 1000000ull /* a longer gap: the host paused, not an estimate */

static inline uint32_t load_u32(uint64_t host)
{
    return __atomic_load_n((const uint32_t *)(uintptr_t)host, __ATOMIC_ACQUIRE);
}

static int loop_ready(int epfd, uint64_t wait_ns)
{
    struct epoll_event ev;
    if (wait_ns == 0)
        return epoll_wait(epfd, &ev, 1, 0) > 0;
#ifdef SYS_epoll_pwait2
    static int no_pwait2;
    if (!no_pwait2) {
        struct timespec ts = {(time_t)(wait_ns / 1000000000ull), (long)(wait_ns % 1000000000ull)};
        long r = syscall(SYS_epoll_pwait2, epfd, &ev, 1, &ts, NULL, (size_t)8);
        if (r >= 0)
            return r > 0;
        if (errno == EINTR)
            return 1; /* a signal: Python runs its handlers once it has the thread back */
        if (errno != ENOSYS)
            return 0;
        no_pwait2 = 1;
    }
#endif
    struct timespec ts = {0, (long)wait_ns};
    if (nanosleep(&ts, NULL) < 0 && errno == EINTR)
        return 1;
    return epoll_wait(epfd, &ev, 1, 0) > 0;
}

/* Signal the completions not signalled yet, or hold them (see above).  1 if held. */
static int sqw_signal(struct sqw_entry *e, uint64_t now, uint64_t hold_ns)
{
    const uint32_t size = e->b->cq_size;
    if (e->signaled == e->cq_tail)
        return 0;
    uint32_t head = load_u32(e->shadow_head);
    if (head < size) {
        uint32_t unseen = (e->cq_tail + size - head) % size;       /* the host has not read */
        uint32_t unsignaled = (e->cq_tail + size - e->signaled) % size;
        if (unseen == 0) { /* the host read them all already (in the pass for the last one) */
            e->signaled = e->cq_tail;
            e->held_ns = 0;
            return 0;
        }
        if (hold_ns && unseen > unsignaled && (!e->held_ns || now - e->held_ns < hold_ns)) {
            if (!e->held_ns) /* still reading completions it was told of */
                e->held_ns = now;
            return 1;
        }
    }
    e->signaled = e->cq_tail;
    e->held_ns = 0;
    if (e->irq_fd >= 0) {
        uint64_t one = 1;
        if (write(e->irq_fd, &one, sizeof one) == (ssize_t)sizeof one || errno == EAGAIN)
            e->irqs++; /* EAGAIN: the counter is full, the reader sees it nonzero anyway */
    }
    return 0;
}

/* The arrival estimate (see "Naps for a host with one command in flight" above).  A
 * gap seen while spinning is the host's own: a shorter one takes over at once, a longer
 * one raises the estimate by an eighth of the difference (one slow round trip of the
 * host does not spoil it).  A command found on waking from a nap of ``napped`` ns came
 * at some time during it: the gap was between ``gap - napped`` and ``gap``.  If even
 * the least of that is beyond the estimate, it raises it as above; otherwise the
 * estimate moves below both what was seen and itself (by ``early_ns`` or a sixteenth):
 * without that, naps that end at the estimate would only ever confirm it. */
static void sqw_learn_gap(struct sqw_entry *e, uint64_t gap, uint64_t napped, uint64_t early_ns)
{
    if (gap > SQW_EXPECT_MAX_NS)
        return; /* the host paused: says nothing of its round trip */
    if (napped) {
        uint64_t least = gap > napped ? gap - napped : 0;
        if (e->gap_ns && least > e->gap_ns) {
            gap = least; /* later than expected in any case */
        } else {
            uint64_t step = e->gap_ns >> 4 > early_ns ? e->gap_ns >> 4 : early_ns;
            uint64_t lower = e->gap_ns > step ? e->gap_ns - step : 1;
            gap = gap > early_ns ? gap - early_ns : 1;
            e->gap_ns = e->gap_ns && lower < gap ? lower : gap;
            return;
        }
    }
    if (e->gap_ns == 0 || gap < e->gap_ns)
        e->gap_ns = gap;
    else
        e->gap_ns += (gap - e->gap_ns) >> 3;
}

/* What the arrival estimates ask of the wait at ``now``: -1 nothing (the usual spin
 * and naps: some entry has commands or no estimate), 0 spin (a command is due), or
 * the nanoseconds to nap before the earliest entry's command is due.  An entry long
 * past its due time is idle; it only keeps the nap within ``nap_max_ns``. */
static int64_t sqw_expect(const struct sqw_entry *e, uint32_t n, uint64_t now, uint64_t nap_max_ns,
                          uint64_t early_ns)
{
    uint64_t nap = UINT64_MAX;
    int any = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (e[i].stop)
            continue;
        if (!e[i].empty_ns || !e[i].gap_ns || e[i].sq_head != e[i].sq_tail)
            return -1;
        uint64_t due = e[i].empty_ns + e[i].gap_ns;
        uint64_t from = due > early_ns ? due - early_ns : 0;
        if (now >= due + 4 * early_ns) { /* overdue */
            if (nap > nap_max_ns)
                nap = nap_max_ns;
            continue;
        }
        if (now >= from)
            return 0;
        any = 1;
        if (from - now < nap)
            nap = from - now;
    }
    if (!any || nap > SQW_EXPECT_MAX_NS)
        return -1;
    return (int64_t)nap;
}

/* One entry's turn: the commands it served, or 1 if it only saw new ones. */
static int sqw_turn(struct sqw_entry *e, uint64_t now, uint64_t napped, uint64_t early_ns)
{
    struct ioq_batch *b = e->b;
    uint32_t tail = load_u32(e->shadow_tail);
    int found = 0;
    if (tail >= b->sq_size) {
        e->stop = SQW_SHADOW;
        return 0;
    }
    if (tail != e->sq_tail) {
        if ((tail + b->sq_size - e->sq_tail) % b->sq_size > 1)
            e->gap_ns = 0; /* several commands at once: not a host with one in flight */
        else if (e->empty_ns && now > e->empty_ns)
            sqw_learn_gap(e, now - e->empty_ns, napped, early_ns);
        e->sq_tail = tail;
        e->last_ns = now;
        found = 1;
        e->empty_ns = 0;
    }
    if (e->sq_head == e->sq_tail) {
        if (now >= e->last_ns && now - e->last_ns >= e->idle_ns && e->signaled == e->cq_tail)
            e->stop = SQW_IDLE;
        return found;
    }
    if ((e->cq_tail + 1) % b->cq_size == e->cq_head) { /* full: has the host moved its head? */
        uint32_t head = load_u32(e->shadow_head);
        if (head >= b->cq_size) {
            e->stop = SQW_SHADOW;
            return found;
        }
        e->cq_head = head;
    }
    b->byte_limit = e->turn_bytes;
    int done = ioq_serve(b, e->sq_head, e->sq_tail, e->cq_head, e->cq_tail, e->cq_phase, 1u << 30);
    b->byte_limit = 0; /* (the batch struct is the fast path's too) */
    if (done > 0) {
        e->sq_head = b->sq_head;
        e->cq_tail = b->cq_tail;
        e->cq_phase = b->cq_phase;
        e->done += (uint64_t)done;
        e->writes += b->writes;
        e->read_bytes += b->read_bytes;
        e->write_bytes += b->write_bytes;
        e->sgls += b->sgls;
        for (uint32_t i = 0; i < b->nlat; i++)
            e->lat[b->lat_bucket[i]] += b->lat_count[i];
        e->last_ns = now_ns(); /* the idle spell counts from the end of the work */
        found = done;
        if (e->sq_head == e->sq_tail)
            e->empty_ns = e->last_ns; /* the host's next command is due in about gap_ns */
    }
    if (b->stop != IOQ_STOP_EMPTY && b->stop != IOQ_STOP_CQ_FULL && b->stop != IOQ_STOP_LIMIT)
        e->stop = SQW_STOP_BASE + b->stop;
    return found;
}

int sqw_wait(struct sqw_entry *e, uint32_t n, int epfd, int64_t timeout_ns, uint64_t spin_ns,
             uint64_t nap_ns, uint64_t nap_max_ns, uint64_t hold_ns, uint64_t early_ns)
{
    const uint64_t start = now_ns();
    uint64_t last = start, batch = 1;
    /* the nap (ns) this turn follows: what it finds came during it; at the start, the
     * time Python had the thread since the last wait (unknown: as good as a long nap) */
    uint64_t napped = UINT64_MAX;
    for (;;) {
        uint64_t now = now_ns();
        int left = 0, held = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (e[i].stop)
                continue;
            int got = sqw_turn(&e[i], now, napped, early_ns);
            held |= sqw_signal(&e[i], now, hold_ns);
            if (got) {
                if (last != now)
                    batch = 0;
                last = now;
                if ((uint64_t)got > batch)
                    batch = (uint64_t)got;
            }
            if (e[i].stop)
                left = 1;
        }
        if (left)
            return 2;
        if (timeout_ns == 0)
            return 0;
        now = now_ns();
        if (timeout_ns > 0 && now - start >= (uint64_t)timeout_ns)
            return 0;
        uint64_t nap = 0;
        int64_t expect = held || !early_ns ? -1 : sqw_expect(e, n, now, nap_max_ns, early_ns);
        if (expect > 0) {
            nap = (uint64_t)expect; /* no command is due before then */
        } else if (expect < 0 && now - last >= spin_ns) {
            nap = held ? nap_ns : nap_ns * batch; /* held completions: look again soon */
            if (nap > nap_max_ns)
                nap = nap_max_ns;
        }
        if (timeout_ns > 0 && nap > start + (uint64_t)timeout_ns - now)
            nap = start + (uint64_t)timeout_ns - now;
        if (loop_ready(epfd, nap))
            return 1;
        napped = nap ? now_ns() - now : 0;
    }
}
