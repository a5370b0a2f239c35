/*
 * Little-endian loads from guest memory, shared by the C sources of cbind/
 * (each module's Python side puts this text in front of its .c file).  NVMe
 * structures are little-endian (NVMe Base 2.1 §1.5, conventions): SQE fields,
 * PRP entries, SGL descriptors.
 */
#include <stdint.h>
#include <string.h>

static inline uint32_t le32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}
