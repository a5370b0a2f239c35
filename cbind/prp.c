/*
 * The per-entry loop of a PRP list walk, NVMe Base 2.1 §4.1.1 (Physical Region
 * Page Entry and List).  Built by cbind/prp.py through cffi API mode; the
 * Python side reads the list from guest memory and drives page chaining, this
 * checks and merges the entries of one list page chunk.
 */
#include <stdint.h>
#include <string.h>

/* A PRP entry is a little-endian qword (§4.1.1, PRP Entry layout): le64 of
 * cbind/le.h, in front of this file. */

/*
 * raw:       n PRP entries as read from one PRP list page (no chain pointer)
 * page_size: CC.MPS memory page size (a power of two)
 * remaining: bytes of the transfer still to describe before the first entry
 * segs:      in: segs[0], segs[1] = the last (address, length) segment so far;
 *            out: the merged segments, the first replacing that last one.
 *            Room for 2 * (n + 1) qwords.
 *
 * Returns the number of segments in segs (>= 1), or -(i + 1) when entry i has
 * a nonzero offset (§4.1.1: entries in a PRP list shall have a memory page
 * offset of 0h; the caller reports PRP Offset Invalid).
 */
int64_t prp_list_merge(const char *raw, size_t n, uint64_t page_size,
                       uint64_t remaining, uint64_t *segs)
{
    const unsigned char *p = (const unsigned char *)raw;
    const uint64_t mask = page_size - 1;
    uint64_t addr = segs[0], len = segs[1];
    size_t k = 0;

    for (size_t i = 0; i < n; i++) {
        uint64_t e = le64(p + 8 * i);
        uint64_t take = remaining < page_size ? remaining : page_size;

        if (e & mask)
            return -(int64_t)i - 1;
        /* Physically contiguous with the segment so far: extend it.  Written
         * as a difference so that addr + len cannot wrap past 2^64. */
        if (e >= addr && e - addr == len) {
            len += take;
        } else {
            segs[2 * k] = addr;
            segs[2 * k + 1] = len;
            k++;
            addr = e;
            len = take;
        }
        remaining -= take;
    }
    segs[2 * k] = addr;
    segs[2 * k + 1] = len;
    return (int64_t)k + 1;
}
