/*
 * A TCG plugin for QEMU 11 (plugin API 7): how many guest instructions each
 * translated block executed, and the vCPU threads' CPU time, on request.
 * emulator/guest/tcgprof.py builds it (cc -shared) and reads it for
 * ``bench --insn``; it is a measuring instrument, not part of the device.
 *
 * Each translated block gets a slot (its guest virtual address and its
 * instruction count) and an inline "add 1" per execution into a per-vCPU
 * scoreboard: no helper call, so the guest runs at near full TCG speed.
 *
 * ``sock=PATH``: a UNIX stream socket.  For each byte a client sends, the
 * plugin answers one snapshot (all integers little-endian):
 *
 *   u32 magic 'TCGP', u32 nslots, u32 first_new, u32 reserved,
 *   u64 vcpu_cpu_ns (CPU time of the vCPU threads so far),
 *   u64 vaddr[nslots - first_new], u32 ninsn[nslots - first_new]
 *       (the slots translated since the previous snapshot),
 *   u64 count[nslots] (executions of each slot so far, all vCPUs).
 *
 * The declarations below are the few entry points of QEMU's
 * include/plugins/qemu-plugin.h this file needs, written out for API level 7
 * (QEMU 11 refuses plugins built for a lower level).
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_scoreboard;
typedef struct { struct qemu_plugin_scoreboard *score; size_t offset; } qemu_plugin_u64;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(struct qemu_plugin_tb *tb, void *userdata);
typedef void (*vcpu_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb, void *userdata);
void qemu_plugin_register_vcpu_init_cb(qemu_plugin_id_t id, vcpu_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                                       qemu_plugin_u64 entry, uint64_t imm);
struct qemu_plugin_scoreboard *qemu_plugin_scoreboard_new(size_t element_size);
void *qemu_plugin_scoreboard_find(struct qemu_plugin_scoreboard *score, unsigned int vcpu_index);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
int qemu_plugin_num_vcpus(void);

__attribute__((visibility("default"))) int qemu_plugin_version = 7;

#define MAX_SLOTS (1u << 21) /* slot 0 takes the blocks past the table */
#define MAX_VCPUS 64
#define MAGIC 0x50474354u     /* "TCGP" */

static struct qemu_plugin_scoreboard *board; /* per vCPU: u64 count[MAX_SLOTS] */
static uint64_t slot_vaddr[MAX_SLOTS];
static uint32_t slot_ninsn[MAX_SLOTS];
static uint64_t snap[MAX_SLOTS];
static uint32_t nslots = 1; /* written under QEMU's translation lock, read by the server */
static clockid_t vcpu_clock[MAX_VCPUS];
static int vcpu_clock_ok[MAX_VCPUS];
static char sock_path[108];

/* Translation of one block: give it a slot and count its executions there.  The
 * callback's arguments are (tb, userdata) at API level 7. */
static void on_translate(struct qemu_plugin_tb *tb, void *userdata)
{
    (void)userdata;
    uint32_t s = __atomic_load_n(&nslots, __ATOMIC_RELAXED);
    if (s < MAX_SLOTS) {
        slot_vaddr[s] = qemu_plugin_tb_vaddr(tb);
        slot_ninsn[s] = (uint32_t)qemu_plugin_tb_n_insns(tb);
        __atomic_store_n(&nslots, s + 1, __ATOMIC_RELEASE);
    } else {
        s = 0;
    }
    qemu_plugin_u64 entry = {board, sizeof(uint64_t) * s};
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(tb, QEMU_PLUGIN_INLINE_ADD_U64, entry, 1);
}

/* Runs in each vCPU's own thread: remember that thread's CPU clock (the arguments
 * are not used: their order changed between API levels). */
static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    (void)vcpu_index;
    static unsigned int seen;
    unsigned int v = __atomic_fetch_add(&seen, 1, __ATOMIC_RELAXED);
    clockid_t c;
    if (v < MAX_VCPUS && pthread_getcpuclockid(pthread_self(), &c) == 0) {
        vcpu_clock[v] = c;
        __atomic_store_n(&vcpu_clock_ok[v], 1, __ATOMIC_RELEASE);
    }
}

static int send_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int answer(int fd, uint32_t *known)
{
    uint32_t n = __atomic_load_n(&nslots, __ATOMIC_ACQUIRE);
    int vcpus = qemu_plugin_num_vcpus();
    memset(snap, 0, sizeof(uint64_t) * n);
    uint64_t cpu_ns = 0;
    for (int v = 0; v < vcpus && v < MAX_VCPUS; v++) {
        const uint64_t *c = qemu_plugin_scoreboard_find(board, (unsigned int)v);
        for (uint32_t s = 0; s < n; s++)
            snap[s] += __atomic_load_n(&c[s], __ATOMIC_RELAXED);
    }
    for (int v = 0; v < MAX_VCPUS; v++) {
        struct timespec ts;
        if (__atomic_load_n(&vcpu_clock_ok[v], __ATOMIC_ACQUIRE) && clock_gettime(vcpu_clock[v], &ts) == 0)
            cpu_ns += (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }
    uint32_t first = *known < n ? *known : n;
    uint32_t head[4] = {MAGIC, n, first, 0};
    if (send_all(fd, head, sizeof head) || send_all(fd, &cpu_ns, sizeof cpu_ns) ||
        send_all(fd, slot_vaddr + first, sizeof(uint64_t) * (n - first)) ||
        send_all(fd, slot_ninsn + first, sizeof(uint32_t) * (n - first)) ||
        send_all(fd, snap, sizeof(uint64_t) * n))
        return -1;
    *known = n;
    return 0;
}

/* One client at a time; each gets the slot table from the start. */
static void *serve(void *arg)
{
    int lfd = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        uint32_t known = 1;
        char req;
        while (read(fd, &req, 1) == 1) {
            while (qemu_plugin_num_vcpus() < 1) /* no vCPU yet: its scoreboard is not there */
                usleep(10000);
            if (answer(fd, &known))
                break;
        }
        close(fd);
    }
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++)
        if (!strncmp(argv[i], "sock=", 5))
            snprintf(sock_path, sizeof sock_path, "%s", argv[i] + 5);
    if (!sock_path[0]) {
        fprintf(stderr, "tcgprof: give sock=PATH\n");
        return -1;
    }
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", sock_path);
    unlink(sock_path);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 1)) {
        perror("tcgprof: socket");
        return -1;
    }
    board = qemu_plugin_scoreboard_new(sizeof(uint64_t) * MAX_SLOTS);
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate, NULL);
    pthread_t t;
    if (pthread_create(&t, NULL, serve, (void *)(intptr_t)lfd))
        return -1;
    pthread_detach(t);
    return 0;
}
