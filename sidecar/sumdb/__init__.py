"""The Go checksum database, checked the way the go command checks it (issue 15).

Developer note. The modules follow golang.org/x/mod/sumdb at the pinned
v0.43.0 (the version tests/sumdb/server builds with), one job each:

- ``dirhash``: the ``h1:`` of a module zip (streamed; blocking, run it in a
  thread) and of a go.mod;
- ``note``: verifier keys and signed notes (Ed25519 through ``cryptography``);
- ``gosumdb``: the ``GOSUMDB`` value as the go command reads it, with
  sum.golang.org's published key;
- ``tlog``: record and node hashes, stored hash indexes, tree hashes,
  tree-head notes and lookup records;
- ``tile``: tile coordinates and paths, and the reader that returns only
  hashes from tiles authenticated against a signed tree head;
- ``lookup``: ``SumdbVerifier``, which turns ``lookup`` and ``tile`` answers
  fetched through a caller-given ``fetch`` into verified ``ModuleHashes``.

Nothing here does network I/O itself or knows about upstreams, the cache or
config: the fill path supplies ``fetch`` (through the sidecar's own sumdb
path) and compares ``ModuleHashes`` with ``dirhash`` of what an upstream sent.
Errors are the ``SumdbError`` branch of sidecar.errors: ``SumdbUnavailable``
(no answer: the database says nothing) against ``SumdbVerifyError`` (a wrong
answer: never a reason to trust bytes).

Tests: tests/unit/test_sumdb_*.py on x/mod's own vectors, and
tests/functional/test_sumdb_verify.py against a real Go checksum database
(tests/sumdb/server, built with the go command).
"""
