/* Proof of GPU, the native CPU kernels: the same bits as protocol.py, at the machine's
 * limit. Built by `pip install` (setup.py, optional: without a compiler the numpy code
 * in protocol.py and prover.py is used, and `native.available()` says so).
 *
 * - matrix_words: whole matrices' words (the fill, and a cheater's regeneration);
 * - column_words: one column of each of many matrices (the verifier);
 * - walk_step:    one walk step over matrices stored in generation order (the timed part).
 *
 * Buffers come through the buffer protocol (numpy arrays): no numpy headers are needed to
 * build, so the build works offline. Every kernel releases the GIL.
 *
 * Matrix layout: word l of matrix j (l < n*n/4) is bytes 4l..4l+3 in little-endian order;
 * the n x n matrix M_j[row][col] is byte (col * n + row) of that array, i.e. the bytes
 * are M_j transposed, row-major: "Mt[col][row]". The walk reads Mt rows (contiguous),
 * each one the column the product needs: Y[c] = sum_l x[l] * Mt[c][l] (mod 256).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* one build, the widest vectors the running CPU has (glibc ifunc) */
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define M1 0x7FEB352Du
#define M2 0x446CA68Bu
#define CHUNK 64 /* words mixed together: independent lanes hide the multiplier latency */

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= M1;
    x ^= x >> 15;
    x *= M2;
    x ^= x >> 16;
    return x;
}

/* x[i] <- `rounds` rounds of mix32(x + key), CHUNK words at a time held in registers */
CLONES static void mix_chunk(uint32_t *x, uint32_t key, int rounds) {
    uint32_t v[CHUNK];
    memcpy(v, x, sizeof v);
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < CHUNK; i++) {
            uint32_t y = v[i] + key;
            y ^= y >> 16;
            y *= M1;
            y ^= y >> 15;
            y *= M2;
            y ^= y >> 16;
            v[i] = y;
        }
    }
    memcpy(x, v, sizeof v);
}

static void mix_tail(uint32_t *x, Py_ssize_t count, uint32_t key, int rounds) {
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t y = x[i];
        for (int r = 0; r < rounds; r++) y = mix32(y + key);
        x[i] = y;
    }
}

/* words [first, first + count) of the matrix with key `key`, into out */
static void words_run(uint32_t *out, Py_ssize_t first, Py_ssize_t count, uint32_t k0,
                      uint32_t key, int rounds) {
    for (Py_ssize_t i = 0; i < count; i++) out[i] = mix32((uint32_t)(first + i) ^ k0);
    Py_ssize_t i = 0;
    for (; i + CHUNK <= count; i += CHUNK) mix_chunk(out + i, key, rounds);
    mix_tail(out + i, count - i, key, rounds);
}

static int get(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, view->len, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* matrix_words(out: uint32[count, n*n/4], keys: uint32[count], k0, n, rounds) */
static PyObject *matrix_words(PyObject *self, PyObject *args) {
    PyObject *out_o, *keys_o;
    unsigned int k0;
    Py_ssize_t n, count;
    int rounds;
    if (!PyArg_ParseTuple(args, "OOIni", &out_o, &keys_o, &k0, &n, &rounds)) return NULL;
    if (n < 8 || n % 8 || rounds < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be a positive multiple of 8, rounds >= 0");
        return NULL;
    }
    Py_buffer out, keys;
    if (get(keys_o, &keys, 0, 0, "keys") < 0) return NULL;
    count = keys.len / 4;
    Py_ssize_t per = n * n / 4;
    if (get(out_o, &out, 1, count * per * 4, "out") < 0) {
        PyBuffer_Release(&keys);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    const uint32_t *k = keys.buf;
    for (Py_ssize_t j = 0; j < count; j++)
        words_run((uint32_t *)out.buf + j * per, 0, per, k0, k[j], rounds);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&out);
    PyBuffer_Release(&keys);
    Py_RETURN_NONE;
}

/* column_words(out: uint32[o, w, n/4], cols: int64[o], keys: uint32[o, w], k0, n, rounds):
 * column cols[i] of each matrix keys[i, k] (its words: col * n/4 .. + n/4) */
static PyObject *column_words(PyObject *self, PyObject *args) {
    PyObject *out_o, *cols_o, *keys_o;
    unsigned int k0;
    Py_ssize_t n;
    int rounds;
    if (!PyArg_ParseTuple(args, "OOOIni", &out_o, &cols_o, &keys_o, &k0, &n, &rounds))
        return NULL;
    if (n < 8 || n % 8 || rounds < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be a positive multiple of 8, rounds >= 0");
        return NULL;
    }
    Py_buffer out, cols, keys;
    if (get(cols_o, &cols, 0, 0, "cols") < 0) return NULL;
    Py_ssize_t o = cols.len / 8;
    if (o == 0 || get(keys_o, &keys, 0, 0, "keys") < 0) {
        PyBuffer_Release(&cols);
        if (o == 0) Py_RETURN_NONE;
        return NULL;
    }
    Py_ssize_t w = keys.len / 4 / o, q = n / 4;
    if (get(out_o, &out, 1, o * w * q * 4, "out") < 0) {
        PyBuffer_Release(&cols);
        PyBuffer_Release(&keys);
        return NULL;
    }
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS;
    const int64_t *c = cols.buf;
    const uint32_t *k = keys.buf;
    for (Py_ssize_t i = 0; i < o && !bad; i++) {
        if (c[i] < 0 || c[i] >= n) {
            bad = 1;
            break;
        }
        for (Py_ssize_t t = 0; t < w; t++)
            words_run((uint32_t *)out.buf + (i * w + t) * q, c[i] * q, q, k0, k[i * w + t], rounds);
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&out);
    PyBuffer_Release(&cols);
    PyBuffer_Release(&keys);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "a column is outside the matrix");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* the low byte of x . row over n int8s, four rows at once (x is loaded once): products fit
 * int16, and only the sum mod 256 is wanted, so 16-bit lanes that wrap give the exact byte */
CLONES static void dot_low4(const int8_t *x, const int8_t *rows, Py_ssize_t n, uint8_t *y) {
    uint16_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    const int8_t *r0 = rows, *r1 = rows + n, *r2 = rows + 2 * n, *r3 = rows + 3 * n;
    for (Py_ssize_t l = 0; l < n; l++) {
        int16_t v = x[l];
        a0 += (uint16_t)(v * r0[l]);
        a1 += (uint16_t)(v * r1[l]);
        a2 += (uint16_t)(v * r2[l]);
        a3 += (uint16_t)(v * r3[l]);
    }
    y[0] = (uint8_t)a0;
    y[1] = (uint8_t)a1;
    y[2] = (uint8_t)a2;
    y[3] = (uint8_t)a3;
}

/* walk_step(out: int8[m, n], state: int8[m, n], big: int8[M, n, n] (Mt), js: int64[m, w],
 *           m, n, first, stop, extra=None)
 * For rows r in [first, stop): Y[r, c] = XOR_k low(state[r] . Mt_{js[r,k]}[c]), written as
 * the next state: out.flat[c * m + r] = Y[r, c] - 128. */
static PyObject *walk_step(PyObject *self, PyObject *args) {
    PyObject *out_o, *state_o, *big_o, *js_o, *extra_o = Py_None;
    Py_ssize_t m, n, first, stop;
    if (!PyArg_ParseTuple(args, "OOOOnnnn|O", &out_o, &state_o, &big_o, &js_o, &m, &n, &first,
                          &stop, &extra_o))
        return NULL;
    if (n < 8 || n % 8 || m < 1 || first < 0 || stop > m || first > stop) {
        PyErr_SetString(PyExc_ValueError, "walk_step: bad shape or row range");
        return NULL;
    }
    Py_buffer out, state, big, js, extra = {0};
    if (extra_o != Py_None && get(extra_o, &extra, 0, 0, "extra") < 0) return NULL;
    if (get(state_o, &state, 0, m * n, "state") < 0) {
        if (extra.obj) PyBuffer_Release(&extra);
        return NULL;
    }
    if (get(big_o, &big, 0, 0, "matrices") < 0) goto fail_state;
    if (get(js_o, &js, 0, m, "indices") < 0) goto fail_big;
    if (get(out_o, &out, 1, m * n, "out") < 0) goto fail_js;
    /* indices past the matrices in `big` name those in `extra` (a cheater's remade ones) */
    Py_ssize_t matrices = big.len / (n * n), w = js.len / 8 / m;
    Py_ssize_t extras = extra.obj ? extra.len / (n * n) : 0;
    const int8_t *E = extra.obj ? extra.buf : NULL;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS;
    const int64_t *J = js.buf;
    const int8_t *S = state.buf, *B = big.buf;
    int8_t *O = out.buf;
    uint8_t y[4], acc[4];
    for (Py_ssize_t r = first; r < stop && !bad; r++) {
        const int8_t *x = S + r * n;
        for (Py_ssize_t c = 0; c < n; c += 4) {
            acc[0] = acc[1] = acc[2] = acc[3] = 0;
            for (Py_ssize_t k = 0; k < w; k++) {
                int64_t j = J[r * w + k];
                if (j < 0 || j >= matrices + extras) {
                    bad = 1;
                    break;
                }
                const int8_t *mt = j < matrices ? B + j * n * n : E + (j - matrices) * n * n;
                dot_low4(x, mt + c * n, n, y);
                acc[0] ^= y[0];
                acc[1] ^= y[1];
                acc[2] ^= y[2];
                acc[3] ^= y[3];
            }
            for (int t = 0; t < 4; t++) O[(c + t) * m + r] = (int8_t)(acc[t] ^ 0x80);
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&out);
    PyBuffer_Release(&state);
    PyBuffer_Release(&big);
    PyBuffer_Release(&js);
    if (extra.obj) PyBuffer_Release(&extra);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "walk_step: a matrix index is outside the memory");
        return NULL;
    }
    Py_RETURN_NONE;
fail_js:
    PyBuffer_Release(&js);
fail_big:
    PyBuffer_Release(&big);
fail_state:
    PyBuffer_Release(&state);
    if (extra.obj) PyBuffer_Release(&extra);
    return NULL;
}

/* copy(dst, src): a plain memcpy with the GIL released (the bench's bandwidth baseline) */
static PyObject *copy(PyObject *self, PyObject *args) {
    PyObject *dst_o, *src_o;
    if (!PyArg_ParseTuple(args, "OO", &dst_o, &src_o)) return NULL;
    Py_buffer dst, src;
    if (get(src_o, &src, 0, 0, "src") < 0) return NULL;
    if (get(dst_o, &dst, 1, src.len, "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    memcpy(dst.buf, src.buf, src.len);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

/* read_sum(src): reads every byte once (xor of 8-byte words): the read-only baseline */
CLONES static uint64_t xor_words(const uint64_t *p, Py_ssize_t count) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    Py_ssize_t i = 0;
    for (; i + 4 <= count; i += 4) {
        a ^= p[i];
        b ^= p[i + 1];
        c ^= p[i + 2];
        d ^= p[i + 3];
    }
    for (; i < count; i++) a ^= p[i];
    return a ^ b ^ c ^ d;
}

static PyObject *read_sum(PyObject *self, PyObject *args) {
    PyObject *src_o;
    if (!PyArg_ParseTuple(args, "O", &src_o)) return NULL;
    Py_buffer src;
    if (get(src_o, &src, 0, 0, "src") < 0) return NULL;
    uint64_t x;
    Py_BEGIN_ALLOW_THREADS;
    x = xor_words(src.buf, src.len / 8);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&src);
    return PyLong_FromUnsignedLongLong(x);
}

static PyMethodDef methods[] = {
    {"matrix_words", matrix_words, METH_VARARGS, "Whole matrices' words (the fill)."},
    {"column_words", column_words, METH_VARARGS, "One column of each matrix (the verifier)."},
    {"walk_step", walk_step, METH_VARARGS, "One walk step over rows [first, stop)."},
    {"copy", copy, METH_VARARGS, "memcpy (the bandwidth baseline)."},
    {"read_sum", read_sum, METH_VARARGS, "Read every byte once (the read baseline)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
