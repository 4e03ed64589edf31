/* Proof of GPU: the Merkle root of a walk state, natively (protocol.merkle_root's bits).
 * A separate optional extension because it links the system's libcrypto (OpenSSL, the
 * library Python's hashlib uses): where its headers are missing only this one is not
 * built and the root comes from hashlib.
 *
 * Leaves are SHA-256(0x00 | state u32le | row u32le | row bytes), nodes SHA-256(0x01 |
 * left | right). Large states (a GPU's 1 MiB a step) hash their leaves on several threads:
 * the host's part of every step is on the walk's clock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 8
#define THREADED_BYTES (256 * 1024) /* below this, one thread is faster */

typedef struct {
    const uint8_t *rows;
    Py_ssize_t n, first, stop;
    uint32_t state;
    uint8_t *out; /* 32 bytes a leaf */
    const EVP_MD *md;
    int failed;
} Leaves;

/* SHA-256, fetched once a call: OpenSSL 3 otherwise looks it up on every digest */
static const EVP_MD *sha256(void) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    return EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    return EVP_sha256();
#endif
}

static void release(const EVP_MD *md) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    EVP_MD_free((EVP_MD *)md);
#else
    (void)md;
#endif
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = v & 0xFF;
    p[1] = (v >> 8) & 0xFF;
    p[2] = (v >> 16) & 0xFF;
    p[3] = (v >> 24) & 0xFF;
}

static void *hash_leaves(void *arg) {
    Leaves *job = arg;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        job->failed = 1;
        return NULL;
    }
    uint8_t head[9];
    head[0] = 0;
    put_u32(head + 1, job->state);
    for (Py_ssize_t r = job->first; r < job->stop; r++) {
        put_u32(head + 5, (uint32_t)r);
        if (!EVP_DigestInit_ex(ctx, job->md, NULL) || !EVP_DigestUpdate(ctx, head, 9) ||
            !EVP_DigestUpdate(ctx, job->rows + r * job->n, job->n) ||
            !EVP_DigestFinal_ex(ctx, job->out + 32 * r, NULL)) {
            job->failed = 1;
            break;
        }
    }
    EVP_MD_CTX_free(ctx);
    return NULL;
}

/* merkle_root(state_index, rows: int8[m, n], m, n) -> 32 bytes; m a power of two */
static PyObject *merkle_root(PyObject *self, PyObject *args) {
    unsigned int state;
    PyObject *rows_o;
    Py_ssize_t m, n;
    if (!PyArg_ParseTuple(args, "IOnn", &state, &rows_o, &m, &n)) return NULL;
    if (m < 1 || (m & (m - 1)) || n < 1) {
        PyErr_SetString(PyExc_ValueError, "merkle_root: m must be a power of two, n positive");
        return NULL;
    }
    Py_buffer rows;
    if (PyObject_GetBuffer(rows_o, &rows, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (rows.len < m * n) {
        PyBuffer_Release(&rows);
        PyErr_SetString(PyExc_ValueError, "merkle_root: fewer bytes than m x n");
        return NULL;
    }
    uint8_t *level = malloc(32 * m), root[32];
    const EVP_MD *md = sha256();
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int failed = level == NULL || md == NULL || ctx == NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (!failed) {
        int threads = m * n >= THREADED_BYTES ? MAX_THREADS : 1;
        if (threads > m) threads = (int)m;
        Leaves jobs[MAX_THREADS];
        pthread_t ids[MAX_THREADS];
        int started[MAX_THREADS] = {0};
        for (int t = 0; t < threads; t++) {
            jobs[t] = (Leaves){rows.buf, n, m * t / threads, m * (t + 1) / threads,
                               state, level, md, 0};
            if (t > 0) started[t] = pthread_create(&ids[t], NULL, hash_leaves, &jobs[t]) == 0;
        }
        hash_leaves(&jobs[0]);
        for (int t = 1; t < threads; t++) {
            if (started[t])
                pthread_join(ids[t], NULL);
            else
                hash_leaves(&jobs[t]); /* no thread: do its share here */
            failed |= jobs[t].failed;
        }
        failed |= jobs[0].failed;
        uint8_t pair[65];
        pair[0] = 1;
        for (Py_ssize_t width = m; width > 1 && !failed; width /= 2) {
            for (Py_ssize_t i = 0; i < width / 2; i++) {
                memcpy(pair + 1, level + 64 * i, 64);
                if (!EVP_DigestInit_ex(ctx, md, NULL) || !EVP_DigestUpdate(ctx, pair, 65) ||
                    !EVP_DigestFinal_ex(ctx, level + 32 * i, NULL))
                    failed = 1;
            }
        }
        if (!failed) memcpy(root, level, 32);
    }
    Py_END_ALLOW_THREADS;
    free(level);
    if (ctx) EVP_MD_CTX_free(ctx);
    if (md) release(md);
    PyBuffer_Release(&rows);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "merkle_root: SHA-256 failed (libcrypto)");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)root, 32);
}

static PyMethodDef methods[] = {
    {"merkle_root", merkle_root, METH_VARARGS, "The Merkle root of a walk state."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_merkle", NULL, -1, methods};

PyMODINIT_FUNC PyInit__merkle(void) { return PyModule_Create(&module); }
