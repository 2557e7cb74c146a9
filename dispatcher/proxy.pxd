# C types for dispatcher/proxy.py when setup.py compiles it with Cython: the classes get C fields and
# the methods on the per-request path C calls. Keep in step with the attributes set in the classes'
# __init__ and with the signatures below; the build fails on a mismatch.

cdef Py_ssize_t _PIPELINE, _BACKPRESSURE, _NONE, _HEADER, _IDLE, _UPSTREAM, _FIRST_BYTE
cdef Py_ssize_t _MEMO_ENTRIES, _MEMO_HEAD_MAX, _CHUNKED_BODY, _CHUNK_CUT_MAX, _KEY_LINES, _KEY_LINE, _key_at
cdef bytes _key_lines, _KEY_START, _KEY_BETWEEN
cdef dict _request_heads, _response_heads, _write_heads, _affinities

cimport cython

# the module's functions on the per-request path: C calls from within the module
cpdef fast_request_head(data)
@cython.locals(end=Py_ssize_t)
cpdef fast_write_request(bytes data, Py_ssize_t header_max)
@cython.locals(i=Py_ssize_t)
cpdef bytes generated_key_line()
cpdef cookie_affinity(cookie)
cpdef fast_response_length(head)

cdef class Request
cdef class ClientConnection
cdef class UpstreamConnection
cdef class DataPlane

cdef class Request:
    cdef public ClientConnection conn
    cdef public object method, upgrade, backend, unsent, replay, affinity, route, tried
    cdef public bint ready, keep_alive, http11, chunked, has_body, complete, answered, aborted, safe, plain
    cdef public bint retried_same, hidden, opens
    cdef public UpstreamConnection upstream
    cdef public Py_ssize_t tries, unsent_size, replay_size
    cdef public double started

cdef class ClientConnection:
    cdef public DataPlane plane
    cdef public object parser, transport, client_ip, queue, url, hdrs, error_after, forwarded
    cdef public Request cur, parsing, upgrading
    cdef public UpstreamConnection tunnel
    cdef public Py_ssize_t head_bytes, block, dkind, read_len
    cdef public double deadline
    cdef public bint write_paused, closed, advancing, read_eof
    cpdef _head_ready(self, Request r, url, cookie, head)
    cpdef response_done(self, Request r)
    cpdef _pause(self, Py_ssize_t why)
    cpdef _resume(self, Py_ssize_t why)

cdef class UpstreamConnection:
    cdef public DataPlane plane
    cdef public object backend, transport, parser, out, reason, hdrs, cut
    cdef public Request req
    cdef public ClientConnection client
    cdef public bint reused, read_paused, got_bytes, head_sent, tunnel, until_close, chunk_out, interim
    cdef public bint discard, flushed, hold, failed, chunks, resume
    cdef public Py_ssize_t remaining, fd
    cdef public double idle_since
    cpdef _fast_response(self, ClientConnection client, Request r, data)
    cpdef _pass_body(self, ClientConnection client, Request r, data)
    cpdef _pass_chunks(self, ClientConnection client, Request r, bytes buf, Py_ssize_t pos, Py_ssize_t sent)
    cpdef _resume_parser(self, ClientConnection client, bytes buf, Py_ssize_t line, Py_ssize_t sent)
    cpdef _parse(self, ClientConnection client, data)
    cpdef _complete(self, Request r, bint reusable)
    cpdef _flush(self, ClientConnection client)

cdef class DataPlane:
    cdef public object pool, settings, routes, upstreams, conns, loop, server, _sweeper, _connecting, _probing
    cdef public object errors, failures, time
    cdef public Py_ssize_t requests, responses, retries, redispatches, first_byte_timeouts, probes_failed
    cdef public double t_header, t_idle, t_read, t_first_byte, now
    cdef public Py_ssize_t replay_max, header_max
    cdef object __weakref__
    cpdef dispatch(self, Request r, double now)
    cpdef _forward(self, Request r, b, bint fresh=*, double now=*)
    cpdef _attach(self, Request r, UpstreamConnection up)
    cpdef release_backend(self, Request r)
