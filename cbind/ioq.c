/*
 * The I/O fast path of emulator/nvme/fastpath.py in C: a batch of NVM Read (02h)
 * and Write (01h) commands with PRPs or SGLs (a Data Block descriptor, or a Last
 * Segment of Data Blocks), from SQE fetch to CQE post, straight between guest
 * memory and the namespace's backing file.
 *
 * The Python side (cbind/ioq.py, emulator/nvme/fastpath.py) decides whether
 * the controller is in a state the fast path may serve at all and hands over
 * raw addresses: the guest-memory regions it may touch directly, the rings,
 * the namespaces (fd, geometry, allocation bitmap).  This code never reports
 * an error status: anything it cannot finish exactly as the Python path would
 * (an opcode or flag it does not handle, an LBA range or MDTS violation, a PRP
 * or SGL it cannot follow, memory outside its region table, a short or failed
 * preadv/pwritev, a full CQ) stops the batch *before* that command is
 * consumed, and Python runs it.  A command is consumed (SQ head advanced)
 * only once its CQE is posted.  Reads and writes of the data are idempotent,
 * so a command that stops half way is simply run again by Python.
 *
 * References: NVMe Base 2.1 §3.3 (queues, phase tag), §4.1.1 (PRP entries
 * and lists), §4.3.2 (SGL descriptors, Figure 116), §4.2 (SQE and CQE layouts);
 * NVM Command Set 1.2 §3.3.4 (Read), §3.3.6 (Write); TP4165 allocation
 * tracking (emulator/nvme/allocation.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* BEGIN CDEF: the interface, also read by cbind/ioq.py as its cffi cdef */
/* One guest-memory region the fast path may load from and store into directly
 * (a sealed, mapped DMA region): IOVA range, host address of its first byte. */
struct ioq_region {
    uint64_t iova;
    uint64_t len;
    uint64_t host;
    uint32_t writable;
    uint32_t pad;
};

/* One attached namespace in a simple state (no Write Uncorrectable marks). */
struct ioq_ns {
    uint32_t nsid;
    int32_t fd;          /* backing file, preadv/pwritev */
    uint32_t lba_shift;
    uint32_t pad;
    uint64_t nsze;       /* LBAs */
    uint64_t *words;     /* allocation bitmap, little-endian 64-bit words (TP4165) */
    uint64_t granules;
    uint64_t tlbaag;     /* LBAs per granule */
    int32_t sidecar_fd;  /* write-through target, -1: none */
    uint32_t pad2;
    int64_t sidecar_off; /* byte offset of word 0 in the sidecar */
    uint32_t dirty;      /* out: written through since Python last looked */
    uint32_t stale;      /* out: a write-through failed */
};

/* One call: up to ``limit`` commands of one SQ. */
struct ioq_batch {
    const struct ioq_region *regions;
    uint32_t nregions;
    uint32_t nns;
    struct ioq_ns *ns;
    uint64_t sq_base;
    uint64_t cq_base;
    uint64_t page_size;    /* CC.MPS */
    uint64_t max_transfer; /* MDTS in bytes */
    uint64_t min_write;    /* lowest address a store may go to directly */
    uint32_t sq_size, sqid, cq_size, cq_head;
    uint32_t limit;
    uint32_t sq_head, sq_tail, cq_tail, cq_phase; /* in and out */
    uint32_t done, stop;                          /* out */
    uint64_t reads, writes, read_bytes, write_bytes;
    uint32_t nlat;
    uint32_t lat_bucket[24];
    uint64_t lat_count[24];
    uint64_t sgls;         /* commands with SGLs among them */
    /* out, for one cffi unpack instead of a field access each: done, writes,
     * read_bytes, write_bytes, bitmap flags (bit 0 some ns dirty, bit 1 some
     * ns stale), sgls, nlat, then nlat (bucket, count) pairs; 7 + 2 * 24 words */
    uint64_t *out;
    /* stop (IOQ_STOP_LIMIT) before a command once this many bytes moved, 0: no limit
     * (the poll turns of cbind/sqwait.c set it for their own calls) */
    uint64_t byte_limit;
};

int ioq_run(struct ioq_batch *b);
/* ioq_run with the ring state as arguments (no per-call field stores from
 * Python): the new SQ head, CQ tail and phase follow from the count returned */
int ioq_serve(struct ioq_batch *b, uint32_t sq_head, uint32_t sq_tail, uint32_t cq_head,
              uint32_t cq_tail, uint32_t cq_phase, uint32_t limit);
/* END CDEF */

/* why a batch stopped (ioq_batch.stop) */
#define IOQ_STOP_EMPTY 0     /* SQ empty */
#define IOQ_STOP_LIMIT 1     /* the arbiter's per-pass limit */
#define IOQ_STOP_CQ_FULL 2
#define IOQ_STOP_COMMAND 3   /* a command Python runs (opcode, flags, namespace, range, MDTS) */
#define IOQ_STOP_DATA 4      /* PRPs or SGLs Python must walk (errors, shapes, memory outside the table) */
#define IOQ_STOP_IO 5        /* preadv/pwritev failed or was short */
#define IOQ_STOP_SQ_MEMORY 6 /* the SQ ring is not inside one direct region */
#define IOQ_STOP_CQ_MEMORY 7 /* the CQ ring is not inside one direct writable region */

#define SQE_SIZE 64
#define CQE_SIZE 16
#define OPC_WRITE 0x01
#define OPC_READ 0x02
#define CDW12_FUA (1u << 30)
#define PSDT_SGL 0x40           /* CDW0 bits 15:14 = 01b: SGL, MPTR an address */
#define SGL_DESC_SIZE 16
#define SGL_DATA_BLOCK 0x00     /* SGL Identifier: type 0h, sub type 0h (address) */
#define SGL_LAST_SEGMENT 0x30   /* type 3h, sub type 0h */
#define SGL_MAX_DESCRIPTORS (1u << 16) /* emulator/nvme/sgl.py MAX_DESCRIPTORS */
#define IOQ_IOV_MAX 1024
#define LAT_BUCKETS 24

/* le32, le64: cbind/le.h, in front of this file */

/* Host address of [addr, addr+len) if it lies inside one region (and that
 * region is writable when ``write``), else NULL. */
static unsigned char *xlate(const struct ioq_batch *b, uint64_t addr, uint64_t len, int write)
{
    for (uint32_t i = 0; i < b->nregions; i++) {
        const struct ioq_region *r = &b->regions[i];
        if (addr >= r->iova && addr - r->iova < r->len) {
            uint64_t off = addr - r->iova;
            if (len > r->len - off || (write && !r->writable))
                return NULL;
            return (unsigned char *)(uintptr_t)(r->host + off);
        }
    }
    return NULL;
}

struct iovs {
    struct iovec v[IOQ_IOV_MAX];
    int n;
    uint64_t total;
};

/* Append guest bytes [addr, addr+len) to the iovecs, region by region (a piece
 * may cross from one region into the next when their IOVAs are adjacent, as
 * MappedMemory.views allows).  0 on success, -1 when Python must decide. */
static int add_piece(const struct ioq_batch *b, struct iovs *io, uint64_t addr, uint64_t len,
                     int write)
{
    if (write && addr < b->min_write)
        return -1; /* a store the client must see as a message (visible writes) */
    while (len) {
        const struct ioq_region *r = NULL;
        for (uint32_t i = 0; i < b->nregions; i++) {
            if (addr >= b->regions[i].iova && addr - b->regions[i].iova < b->regions[i].len) {
                r = &b->regions[i];
                break;
            }
        }
        if (r == NULL || (write && !r->writable))
            return -1;
        uint64_t off = addr - r->iova;
        uint64_t k = r->len - off < len ? r->len - off : len;
        unsigned char *host = (unsigned char *)(uintptr_t)(r->host + off);
        if (io->n > 0) {
            struct iovec *last = &io->v[io->n - 1];
            if ((unsigned char *)last->iov_base + last->iov_len == host) {
                last->iov_len += k;
                goto next;
            }
        }
        if (io->n == IOQ_IOV_MAX)
            return -1;
        io->v[io->n].iov_base = host;
        io->v[io->n].iov_len = k;
        io->n++;
next:
        io->total += k;
        addr += k;
        len -= k;
    }
    return 0;
}

/* PRP1/PRP2 (Base 2.1 §4.1.1) of a transfer of ``length`` bytes to iovecs.
 * Anything the Python walk (emulator/nvme/prp.py) would refuse, or that we
 * cannot reach, returns -1: Python runs the command and reports the status. */
static int prp_iovs(const struct ioq_batch *b, uint64_t prp1, uint64_t prp2, uint64_t length,
                    int write, struct iovs *io)
{
    const uint64_t ps = b->page_size, mask = ps - 1;
    io->n = 0;
    io->total = 0;
    if (length == 0 || (prp1 & 0x3))
        return -1;
    uint64_t first = ps - (prp1 & mask);
    if (first > length)
        first = length;
    if (add_piece(b, io, prp1, first, write))
        return -1;
    uint64_t remaining = length - first;
    if (remaining == 0)
        return 0;
    if (remaining <= ps) {
        if (prp2 & mask)
            return -1;
        return add_piece(b, io, prp2, remaining, write);
    }
    if (prp2 & 0x7)
        return -1;
    uint64_t list = prp2;
    uint64_t npages = (remaining + mask) / ps;
    uint64_t hops = npages + 1;
    while (npages) {
        if (hops-- == 0)
            return -1;
        uint64_t slots = (ps - (list & mask)) / 8;
        uint64_t take = npages <= slots ? npages : slots - 1;
        int chained = take < npages;
        if (take == 0 && !chained)
            return -1;
        const unsigned char *raw = xlate(b, list, (take + chained) * 8, 0);
        if (raw == NULL)
            return -1;
        for (uint64_t i = 0; i < take; i++) {
            uint64_t e = le64(raw + 8 * i);
            uint64_t m = remaining < ps ? remaining : ps;
            if (e & mask)
                return -1;
            if (add_piece(b, io, e, m, write))
                return -1;
            remaining -= m;
        }
        npages -= take;
        if (chained) {
            uint64_t nxt = le64(raw + 8 * take);
            if (nxt & 0x7)
                return -1;
            list = nxt;
        }
    }
    return 0;
}

/* SGL1 (Base 2.1 §4.3.2) of a transfer of ``length`` bytes to iovecs: address
 * ``addr``, ``dw`` the PRP2 bytes (Length 11:8, SGL Identifier 15).  Served:
 * a Data Block descriptor, or a Last Segment descriptor whose segment (inside
 * the region table) holds only Data Block descriptors; zero-length Data
 * Blocks are skipped.  The lengths must add up to the transfer exactly.
 * Everything else, and anything emulator/nvme/sgl.py would refuse, is -1. */
static int sgl_iovs(const struct ioq_batch *b, uint64_t addr, uint64_t dw, uint64_t length,
                    int write, struct iovs *io)
{
    const unsigned ident = (unsigned)(dw >> 56);
    const uint64_t n = dw & 0xFFFFFFFFu;
    io->n = 0;
    io->total = 0;
    if (ident == SGL_DATA_BLOCK)
        return n == length ? add_piece(b, io, addr, n, write) : -1;
    if (ident != SGL_LAST_SEGMENT || n == 0 || n % SGL_DESC_SIZE
        || n / SGL_DESC_SIZE >= SGL_MAX_DESCRIPTORS)
        return -1; /* a Segment (chain), Bit Bucket, Keyed, a sub type; a malformed segment */
    const unsigned char *raw = xlate(b, addr, n, 0);
    if (raw == NULL)
        return -1;
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i += SGL_DESC_SIZE) {
        const unsigned char *d = raw + i;
        if (d[15] != SGL_DATA_BLOCK)
            return -1;
        uint64_t k = le32(d + 8);
        if (k == 0)
            continue;
        total += k;
        if (total > length || add_piece(b, io, le64(d), k, write))
            return -1;
    }
    return total == length ? 0 : -1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int pwrite_all(int fd, const void *buf, size_t n, off_t off)
{
    const char *p = buf;
    while (n) {
        ssize_t k = pwrite(fd, p, n, off);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0)
            return -1;
        p += k;
        n -= (size_t)k;
        off += k;
    }
    return 0;
}

/* AllocationMap.mark_allocated (emulator/allocation.py): set every granule
 * [slba, slba+nlb) touches; write the changed words through to the sidecar.
 * As there: one word -> written (and dirty) only if it changed; several
 * words -> written and dirty always. */
static void mark_allocated(struct ioq_ns *ns, uint64_t slba, uint64_t nlb)
{
    uint64_t g0 = slba / ns->tlbaag;
    uint64_t g1 = (slba + nlb - 1) / ns->tlbaag + 1;
    if (g1 > ns->granules)
        g1 = ns->granules;
    if (g1 <= g0)
        return;
    uint64_t w0 = g0 >> 6, w1 = (g1 - 1) >> 6;
    uint64_t first = ~0ull << (g0 & 63);
    uint64_t last = ~0ull >> (63 - ((g1 - 1) & 63));
    uint64_t *w = ns->words;
    if (w0 == w1) {
        uint64_t old = w[w0];
        w[w0] = old | (first & last);
        if (w[w0] == old)
            return;
    } else {
        w[w0] |= first;
        for (uint64_t i = w0 + 1; i < w1; i++)
            w[i] = ~0ull;
        w[w1] |= last;
    }
    if (ns->sidecar_fd < 0)
        return;
    ns->dirty = 1;
    if (pwrite_all(ns->sidecar_fd, &w[w0], (size_t)(w1 - w0 + 1) * 8,
                   (off_t)(ns->sidecar_off + (int64_t)w0 * 8)))
        ns->stale = 1; /* Python logs it; the next flush rewrites the bitmap */
}

int ioq_run(struct ioq_batch *b)
{
    struct iovs io; /* on the stack: several event loops (threads) may call at once */
    const unsigned char *sq = xlate(b, b->sq_base, (uint64_t)b->sq_size * SQE_SIZE, 0);
    unsigned char *cq = xlate(b, b->cq_base, (uint64_t)b->cq_size * CQE_SIZE, 1);
    b->done = 0;
    b->nlat = 0;
    b->reads = b->writes = b->read_bytes = b->write_bytes = b->sgls = 0;
    if (sq == NULL) {
        b->stop = IOQ_STOP_SQ_MEMORY;
        return 0;
    }
    if (cq == NULL || b->cq_base < b->min_write) {
        b->stop = IOQ_STOP_CQ_MEMORY;
        return 0;
    }
    b->stop = IOQ_STOP_EMPTY;
    while (b->sq_head != b->sq_tail) {
        if (b->done >= b->limit
            || (b->byte_limit && b->read_bytes + b->write_bytes >= b->byte_limit)) {
            b->stop = IOQ_STOP_LIMIT;
            break;
        }
        /* CQ full: tail + 1 == head (§3.3.1.5); Python refreshes the head first */
        if ((b->cq_tail + 1) % b->cq_size == b->cq_head) {
            b->stop = IOQ_STOP_CQ_FULL;
            break;
        }
        uint64_t t0 = now_ns();
        const unsigned char *e = sq + (uint64_t)b->sq_head * SQE_SIZE;
        unsigned opc = e[0], flags = e[1];
        uint16_t cid = (uint16_t)(e[2] | (e[3] << 8));
        uint32_t nsid = le32(e + 4);
        uint64_t prp1 = le64(e + 24), prp2 = le64(e + 32);
        uint32_t cdw10 = le32(e + 40), cdw11 = le32(e + 44), cdw12 = le32(e + 48);
        int write;
        if (opc == OPC_READ)
            write = 0;
        else if (opc == OPC_WRITE && !(cdw12 & CDW12_FUA))
            write = 1;
        else {
            b->stop = IOQ_STOP_COMMAND;
            break;
        }
        if (flags & 0x83) { /* FUSE (bits 1:0), PSDT (bits 7:6) 10b or 11b */
            b->stop = IOQ_STOP_COMMAND;
            break;
        }
        const int sgl = flags & PSDT_SGL;
        struct ioq_ns *ns = NULL;
        for (uint32_t i = 0; i < b->nns; i++) {
            if (b->ns[i].nsid == nsid) {
                ns = &b->ns[i];
                break;
            }
        }
        uint64_t slba = (uint64_t)cdw10 | ((uint64_t)cdw11 << 32);
        uint64_t nlb = (uint64_t)(cdw12 & 0xFFFF) + 1;
        if (ns == NULL || slba > ns->nsze || nlb > ns->nsze - slba) {
            b->stop = IOQ_STOP_COMMAND;
            break;
        }
        uint64_t length = nlb << ns->lba_shift;
        if (length > b->max_transfer) {
            b->stop = IOQ_STOP_COMMAND;
            break;
        }
        /* a read stores into guest memory: the data buffer must be writable */
        if ((sgl ? sgl_iovs(b, prp1, prp2, length, !write, &io)
                 : prp_iovs(b, prp1, prp2, length, !write, &io))
            || io.total != length) {
            b->stop = IOQ_STOP_DATA;
            break;
        }
        off_t off = (off_t)(slba << ns->lba_shift);
        ssize_t got = write ? pwritev(ns->fd, io.v, io.n, off) : preadv(ns->fd, io.v, io.n, off);
        if (got < 0 || (uint64_t)got != length) {
            b->stop = IOQ_STOP_IO; /* Python redoes it and reports what it finds */
            break;
        }
        if (sgl)
            b->sgls++;
        if (write) {
            mark_allocated(ns, slba, nlb);
            b->writes++;
            b->write_bytes += length;
        } else {
            b->reads++;
            b->read_bytes += length;
        }
        /* consume the SQE, then post the CQE: DW0, DW1, SQHD|SQID, CID|status|phase;
         * the dword holding the phase tag goes last (§4.2.4) */
        b->sq_head = b->sq_head + 1 == b->sq_size ? 0 : b->sq_head + 1;
        unsigned char *c = cq + (uint64_t)b->cq_tail * CQE_SIZE;
        uint32_t dw[3] = {0, 0, (uint32_t)b->sq_head | ((uint32_t)b->sqid << 16)};
        uint32_t dw3 = (uint32_t)cid | ((uint32_t)(b->cq_phase & 1) << 16);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        dw[2] = __builtin_bswap32(dw[2]);
        dw3 = __builtin_bswap32(dw3);
#endif
        memcpy(c, dw, sizeof dw);
        __atomic_store_n((uint32_t *)(c + 12), dw3, __ATOMIC_RELEASE);
        if (++b->cq_tail == b->cq_size) {
            b->cq_tail = 0;
            b->cq_phase ^= 1;
        }
        b->done++;
        /* cmd_stats latency bucket: (ns >> 10).bit_length(), capped (cmdstats.py) */
        uint64_t q = (now_ns() - t0) >> 10;
        unsigned bucket = q ? 64 - (unsigned)__builtin_clzll(q) : 0;
        if (bucket >= LAT_BUCKETS)
            bucket = LAT_BUCKETS - 1;
        uint32_t k = 0;
        while (k < b->nlat && b->lat_bucket[k] != bucket)
            k++;
        if (k == b->nlat) {
            b->lat_bucket[k] = bucket;
            b->lat_count[k] = 0;
            b->nlat++;
        }
        b->lat_count[k]++;
    }
    if (b->out != NULL) {
        uint64_t *o = b->out, flags = 0;
        if (b->writes)
            for (uint32_t i = 0; i < b->nns; i++)
                flags |= (b->ns[i].dirty ? 1u : 0u) | (b->ns[i].stale ? 2u : 0u);
        o[0] = b->done;
        o[1] = b->writes;
        o[2] = b->read_bytes;
        o[3] = b->write_bytes;
        o[4] = flags;
        o[5] = b->sgls;
        o[6] = b->nlat;
        for (uint32_t i = 0; i < b->nlat; i++) {
            o[7 + 2 * i] = b->lat_bucket[i];
            o[8 + 2 * i] = b->lat_count[i];
        }
    }
    return (int)b->done;
}

int ioq_serve(struct ioq_batch *b, uint32_t sq_head, uint32_t sq_tail, uint32_t cq_head,
              uint32_t cq_tail, uint32_t cq_phase, uint32_t limit)
{
    b->sq_head = sq_head;
    b->sq_tail = sq_tail;
    b->cq_head = cq_head;
    b->cq_tail = cq_tail;
    b->cq_phase = cq_phase;
    b->limit = limit;
    return ioq_run(b);
}
