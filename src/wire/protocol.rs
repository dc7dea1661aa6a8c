//! The xenmig wire protocol between a *source* end (reads the image) and a
//! *target* end (writes the copy and holds the references).
//!
//! ```text
//!  source                                              target
//!    | -- Hello(version, role=source, caps) -------------> |
//!    | <------------- Hello(version, role=target, caps) -- |
//!    | -- ImageInfo(algorithm, layout) ------------------> |  target opens DST,
//!    |                                                     |  hashes DST + refs
//!    | -- Groups(first, group digests...) ---------------> |  streamed while the
//!    | -- Groups(...) -----------------------------------> |  source still hashes
//!    | -- GroupsEnd(image digest) -----------------------> |
//!    | <----------------- WantDigests(first group, count) -|  groups it lacks
//!    | -- BlockDigests(group, 15-byte keys...) ----------> |
//!    | <--------------------- Fetch(first block, count) -- |  missing runs,
//!    | <--------------------- Fetch(...) ----------------- |  pipelined: never
//!    | -- Blocks(first, count, codec, payload) ----------> |  waits for a reply
//!    | -- Blocks(...) -----------------------------------> |
//!    | <--------------------------- Done(report JSON) ---- |  after verifying
//!    | -- Bye(downtime) ---------------------------------> |
//! ```
//!
//! Live copies (`--live`, capability [`CAP_LIVE`]) run that exchange in
//! passes while the guest keeps writing. Each pass opens with
//! `PassBegin(n, final)`; later passes announce only the groups that changed
//! (or that the target could not verify) since the previous pass. A
//! non-final pass ends with the target's `PassDone(n, stale groups)`
//! instead of `Done`: blocks that changed between the source's hashing and
//! its reading them cannot be verified yet and are simply announced again.
//! The final pass runs with the source frozen and is strict, as above:
//!
//! ```text
//!    | -- PassBegin(1, live) -> Groups.. GroupsEnd ------> |
//!    |        (WantDigests / Fetch / replies as above)     |
//!    | <------------------------- PassDone(1, stale) ----- |
//!    | -- PassBegin(2, live) -> changed Groups.. End ----> |
//!    | <------------------------- PassDone(2, stale) ----- |
//!    |   freeze                                            |
//!    | -- PassBegin(3, final) -> changed Groups.. End ---> |
//!    | <----------------------------------- Done --------- |
//!    |   thaw                                              |
//!    | -- Bye(downtime) ---------------------------------> |
//! ```
//!
//! Requests and replies are matched by the block or group numbers they
//! carry, not by order, so the target keeps many requests in flight and the
//! source answers them on several threads.
//!
//! Receiver (target) states:
//!
//! ```text
//!  AwaitHello -> AwaitImageInfo -> Comparing --(GroupsEnd and every group
//!  settled and verified)--> Finishing --(Done sent, Bye read)--> Closed
//!  any state --(Error frame, bad frame, EOF, idle timeout, a frame the
//!  state does not allow)--> Failed (nothing reported verified; DST holds
//!  only its old copy's blocks and blocks checked against their keys)
//! ```
//!
//! Frames the state does not allow include: `Blocks` for a block that was
//! not requested in this pass (its group's `BlockDigests` did not arrive in
//! this pass, or it is already settled), a reply with no request
//! outstanding, and anything that would take a counter below zero (every
//! counter is decremented with checked arithmetic). `KeepAlive` is allowed
//! in every state after the handshake (version 2).
//!
//! A group is *settled* when every block in it is zero, found locally, or
//! fetched, and each of those blocks matched its key; it is *verified* when
//! the full digests of what was written reproduce the source's group digest.
//!
//! Framing: `u8 kind, u32 payload length (LE), payload`. A payload longer
//! than [`MAX_FRAME`] or shorter/longer than its kind requires is an error
//! naming the frame; nothing is read past what a frame declares.
//!
//! Liveness (version 2): each end times out a peer that sends nothing for
//! its idle timeout (`--idle-timeout`, default
//! [`DEFAULT_IDLE_TIMEOUT`](crate::wire::liveness::DEFAULT_IDLE_TIMEOUT)) while it waits for
//! that peer, and sends an empty `KeepAlive` frame whenever it has written
//! nothing for a quarter of its timeout, so that a healthy end that is idle
//! (a source between passes while `migrate` waits for `xl`, a target hashing
//! DST or its references) never looks dead. Keep-alives may come between any
//! two frames, in any state after the handshake, and are skipped by the
//! reader. A timeout fails the copy as any broken link does: an error naming
//! the silent peer and how long it was silent, nothing reported verified,
//! a frozen source thawed.
//!
//! Flow control (version 2): the target keeps at most [`WINDOW`] replies
//! outstanding (a `Fetch` awaits one `Blocks`, `WantDigests(_, n)` awaits n
//! `BlockDigests`); the source queues at most that many requests and stops
//! reading the link while its queue is full, so a peer that floods requests
//! without reading the replies is held by back-pressure instead of growing
//! the source's memory.
//!
//! Compression context (capability [`CAP_ZSTD_STREAM`]): when both ends
//! set it, the source may send a run as codec
//! [`STREAM_CODE`](crate::wire::stream::STREAM_CODE): the next flushed piece
//! of one zstd stream that lasts the whole copy (all passes), so each run
//! is compressed with everything streamed before it as history. Such
//! payloads must be decompressed in the order their frames arrive, which is
//! the order the source wrote them; requests are still answered out of
//! order. Other codecs stay per run and bypass the stream. The window is at
//! most 2^[`WINDOW_LOG_MAX`](crate::wire::stream::WINDOW_LOG_MAX) bytes; the
//! target refuses a stream asking for more. A stream payload without the
//! capability agreed is an error.
//!
//! Changed blocks against their old version (capability
//! [`CAP_SUB_DELTA`]): when both ends set it, the target may ask for a
//! missing block whose old version it holds at the same place in DST with
//! `FetchDelta(block, signature)` instead of `Fetch` (here and below, DST's
//! blocks are the target's old copy: what DST held, a new DST being first
//! filled from a reference laid out alike, its base, `copy::target`; similar
//! blocks may lean on the base's own blocks; the source cannot tell any of
//! this apart, and nothing on the wire depends on it); the signature is a
//! 4-byte hash per 512-byte sub-block of its old block
//! (`wire::subdelta`). The source answers with one
//! `Delta(block, codec, raw_len, payload)`: the payload decodes (with the
//! codec, [`STREAM_CODE`](crate::wire::stream::STREAM_CODE) included, as
//! the next piece of the stream like any run) to a bitmap of the
//! sub-blocks that differ followed by those sub-blocks. The target rebuilds
//! the block from its old bytes, checks it against the block's key and, if
//! it does not match or the body is malformed, fetches the whole block
//! with `Fetch`. A `FetchDelta` awaits one reply, as a `Fetch` does.
//!
//! ```text
//!    | <------------------- FetchDelta(block, sig) ------- |  old version in DST
//!    | -- Delta(block, codec, bitmap + changed subs) ----> |  rebuilt, checked
//!    | <------------------- Fetch(block, 1) -------------- |  only if it failed
//! ```
//!
//! Short sub-block hashes (capability [`CAP_SHORT_SUB_HASHES`], used only
//! with [`CAP_SUB_DELTA`] agreed too): when both ends set it, the target
//! asks every delta with `FetchDeltaShort(block, sig)` instead of
//! `FetchDelta`: the same signature with the first
//! [`SHORT_HASH_LEN`](crate::wire::subdelta::SHORT_HASH_LEN) bytes of each
//! sub-block's hash. The source compares as many bytes of its own hashes
//! and answers with the same `Delta`. A short hash that matches by chance
//! rebuilds a block that fails its key: it is fetched whole, as above. A
//! `FetchDeltaShort` without the capability agreed, or with a signature of
//! another length than the block's sub-blocks call for, is an error.
//!
//! Deltas in batches (capability [`CAP_DELTA_BATCH`], used only with
//! [`CAP_SUB_DELTA`] and [`CAP_SHORT_SUB_HASHES`] agreed too): when both
//! ends set it, the target asks the deltas it has decided on since its last
//! flush with one `FetchDeltas(blocks, sigs)` instead of a
//! `FetchDeltaShort` each: the blocks strictly ascending, as a count, the
//! first block and each gap to the next (LEB128 varints), then their short
//! signatures one after another, each as long as its block's sub-blocks
//! call for. Its blocks' largest bodies
//! ([`max_body`](crate::wire::subdelta::max_body)) add up to at most
//! [`MAX_BATCH_BODY`](crate::wire::subdelta::MAX_BATCH_BODY). The source
//! answers with one `Deltas(codec, raw_len, blocks, payload)`: the same
//! blocks, and a payload that decodes (as a `Delta`'s does, the stream
//! included) to their bodies one after another, each as long as its bitmap
//! says. Each block counts as one reply, as a `Delta` does, and is rebuilt
//! and checked against its key as above. Bodies that do not split the
//! piece exactly (a damaged piece) fetch the blocks from the first that
//! does not split on whole; a `Delta` for a single block stays valid. A
//! `FetchDeltas` or `Deltas` without the capability agreed, with no
//! blocks or more than [`MAX_BATCH_BLOCKS`], blocks not ascending,
//! signatures that do not add up, a batch past that bound, or an answer
//! naming a block not asked is an error naming the frame or the block.
//!
//! ```text
//!    | <----------------- FetchDeltas(blocks, sigs) ------ |  instead of one
//!    | -- Deltas(codec, blocks, bodies as one piece) ----> |  frame per delta
//! ```
//!
//! A run in pieces (capability [`CAP_SPLIT_RUNS`]): when both ends set it,
//! the source may answer a `Fetch(first, count)` with several `Blocks`
//! frames: consecutive runs, the first beginning at `first`, each next
//! one where the last ended, the last ending at `first + count`. The
//! target counts the request answered (one reply, for the window) with the
//! piece that ends it. A run the target asked for unkeyed
//! ([`CAP_HELD_KEYS`]) lies whole in one piece: the source cuts only at
//! group boundaries once the target sent `Holds`. Why: the stream's level
//! changes and its gate holds between pieces, and on a slow link a run of
//! a thousand blocks is seconds of it (`compress::piece_limit`). A piece
//! that does not begin a run asked for or the rest of one, or that ends
//! past its run, is an error naming its blocks. (A `Deltas` batch may be
//! answered in several `Deltas` frames without it: each block there is a
//! reply of its own.)
//!
//! ```text
//!    | <--------------------- Fetch(f, 1024) ------------- |
//!    | -- Blocks(f, 32, piece) --------------------------> |  the rest of the
//!    | -- Blocks(f + 32, 32, piece) ---------------------> |  run still awaited
//!    | -- ... Blocks(f + 992, 32, piece) ----------------> |  answered
//! ```
//!
//! Groups that mostly match DST (capability [`CAP_SUB_GROUPS`]): when both
//! ends set it, the target asks for the keys of a group it could not
//! settle (of at least two sub-groups) with `WantChangedKeys(group, subs,
//! zero bits, sub-group keys)` instead of `WantDigests`: what DST holds at
//! the group's place, by sub-group of
//! [`SUB_BLOCKS`](crate::wire::subgroup::SUB_BLOCKS) blocks (a bit where
//! it is all zeros, a [`KEY_LEN`]-byte sub-group key elsewhere;
//! `wire::subgroup`). The source answers with one `ChangedKeys(group,
//! subs, differ bits, keys)`: the sub-groups that differ from it and the
//! keys of exactly their blocks. The target keeps the blocks of the other
//! sub-groups in place and settles the keyed ones as after `BlockDigests`.
//! The group is then verified against its group digest as always; one
//! that fails it is asked for again with `WantDigests` (every key), and
//! only a second failure fetches it whole. A `WantChangedKeys` awaits one
//! reply. Either frame without the capability agreed, a count of
//! sub-groups other than the group's, a bitmap with bits past them, or
//! keys other than the bitmap calls for is an error naming the frame.
//!
//! ```text
//!    | <---------- WantChangedKeys(g, subs, DST's sig) --- |  instead of
//!    | -- ChangedKeys(g, subs, differ, their keys) ------> |  WantDigests
//! ```
//!
//! Block hints (capability [`CAP_BLOCK_HINTS`], used only with
//! [`CAP_SUB_GROUPS`] agreed too): when both ends set it, the target asks
//! about a group where DST holds any non-zero block with
//! `WantChangedSubs(group, subs, zero bits, short keys)` instead of
//! `WantChangedKeys`: the same signature with sub-group keys cut to
//! [`SHORT_KEY_LEN`](crate::wire::subgroup::SHORT_KEY_LEN) bytes (a group
//! DST holds as all zeros is still asked with `WantChangedKeys` and
//! answered with `ChangedKeys`: there hints would save nothing). The
//! source answers `ChangedSubs(group, subs, differ bits)`: the sub-groups
//! that differ, no keys. For those (if any; none settles the group as
//! DST holds it) the target sends `WantHintedKeys(group, subs, differ,
//! zero, hints)`: `differ` as the source sent it, bit k of `zero` set
//! where DST's sub-group k (one of `differ`'s) is all zeros, and a
//! [`HINT_LEN`](crate::wire::subgroup::HINT_LEN)-byte hint of each of
//! DST's blocks in the other sub-groups of `differ`, in order (the first
//! bytes of its full digest). The source answers `HintedKeys(group, count,
//! changed bits, keys)`: over the `count` blocks of `differ`'s sub-groups,
//! in order, a bit where the block differs (from zeros where `zero` says
//! so, else from its hint), and the keys of exactly those blocks. The
//! target keeps every other block as DST holds it and settles the keyed
//! ones as after `BlockDigests`. A hint or short key that matches by
//! chance keeps an old block: the group then fails its group digest and is
//! asked for again with `WantDigests`, as above; never a wrong block. Each
//! request awaits one reply. Any of these frames without the capability
//! agreed, a count of sub-groups other than the group's, bitmaps of
//! another length or with bits past their count, a `zero` bit outside
//! `differ`, hints or keys other than the bitmaps call for, a `count`
//! other than the blocks of the sub-groups asked about, or an answer for a
//! group not asked about is an error naming the frame.
//!
//! ```text
//!    | <---------- WantChangedSubs(g, subs, short sig) --- |  instead of
//!    | -- ChangedSubs(g, subs, differ) ------------------> |  WantChangedKeys
//!    | <----- WantHintedKeys(g, differ, zero, hints) ----- |  only if any differ
//!    | -- HintedKeys(g, count, changed, their keys) -----> |
//! ```
//!
//! A reference both hosts hold (capability [`CAP_SHARED_REF`]): when both
//! ends set it, the target, once it has loaded its references, sends one
//! `RefOffer` before any request: the image digest (with the copy's digest
//! algorithm and block size, partition-aware layout) and size of each
//! reference it can hold in memory as a dictionary (possibly none). The
//! source answers with one `RefChosen` before any reply: the digest of one
//! of those that it holds too, verified by hashing the bytes it will use,
//! or none. With a reference chosen, the copy's zstd stream starts with
//! that reference's bytes as its prefix (`wire::stream`), on both ends; the
//! target verifies its own bytes against the digest before it decodes, and
//! refuses a window larger than it computes from the two sizes. Everything
//! else is unchanged: reused blocks are not sent, every block written is
//! checked against its key (a dictionary that differs between the ends
//! decodes to blocks that fail it, and the copy fails naming the
//! reference), the image against the image digest. A source that sends a
//! reply before `RefChosen`, or chooses a digest that was not offered, is a
//! protocol error; so is a target whose first frame is not `RefOffer`. A
//! source sets the bit only when it has a `--source-reference` (an image,
//! or a catalog of images by digest: `copy::shared_ref`) or finds one of
//! the target's `-r` paths on its own host, and may stream; either end
//! without it sends neither frame.
//!
//! ```text
//!    | -- ImageInfo -------------------------------------> |  loads its refs
//!    | <--------------- RefOffer([(digest, size)...]) ---- |  before any request
//!    |   (its --source-reference: read and hashed since    |
//!    |    the handshake)                                   |
//!    | -- RefChosen(digest | none) ----------------------> |  before any reply;
//!    |   (Groups, requests and replies as above; stream    |  target loads and
//!    |    pieces decode with the reference as prefix)      |  verifies its bytes
//! ```
//!
//! A reference taken late (capability [`CAP_LATE_REF`], used only with
//! [`CAP_SHARED_REF`] and [`CAP_STREAM_LEVELS`] agreed too): when both
//! ends set it, a chosen reference is *not* the stream's prefix from its
//! start. The stream begins as without one (its frames as
//! `CAP_STREAM_LEVELS` says), and the source sends at most one piece of
//! codec [`STREAM_REF_CODE`](crate::wire::stream::STREAM_REF_CODE): a
//! stream piece in which the running frame ends and the next begins with
//! the chosen reference as its prefix, within the window computed from the
//! two sizes, as above; that frame is the stream's last (no level change
//! follows). As the first piece, it begins the stream's first frame with
//! the reference. The source's choice (`RefChosen`) may then name a
//! reference it has not read yet (a catalog's entry, or one of the
//! target's `-r` paths found on its host, chosen by size): if its bytes do
//! not verify when it comes to take it, no such piece is sent. The source
//! takes a reference of at most 64 MiB with its first piece, a larger one
//! once it has read, verified and indexed it on a thread of its own,
//! started when the stream has carried 16 MiB while the link drains below
//! 30 MB/s, and only if the stream's recent content resembles it
//! (`shared_ref::LatePolicy`, `shared_ref::resemblance`). The piece after
//! it has read, verified and judged it worth taking (before it indexes
//! it) goes as codec
//! [`STREAM_REF_SOON_CODE`](crate::wire::stream::STREAM_REF_SOON_CODE)
//! (otherwise a piece as `STREAM_CODE`), and the target starts reading its
//! copy then (or, without that hint, when the reference's piece comes), so
//! that a short copy, a fast link or a reference not taken costs the
//! target no read. (Session 19's source sent the hint when it began
//! reading; the target cannot tell the two apart and need not.) The
//! target relies on none of that timing: a `STREAM_REF_CODE` piece with
//! no reference chosen, a second one, one without the capability agreed,
//! or one in which no frame begins, is an error naming the piece, as is a
//! `STREAM_REF_SOON_CODE` piece without the capability agreed; the
//! reference's frame carries the same checks as a level change's (at least
//! [`LEVEL_FRAME_MIN`](crate::wire::stream::LEVEL_FRAME_MIN) of content
//! in the frame before). No frame is added.
//!
//! ```text
//!    | -- RefChosen(digest) -----------------------------> |  nothing read yet
//!    | -- Blocks(.., STREAM_CODE, ..) -------------------> |  stream without it
//!    |   (16 MiB streamed, link slow: read, verify, judge  |
//!    |    the reference on a thread of its own; if taken:) |
//!    | -- Blocks(.., STREAM_REF_SOON_CODE, ..) ----------> |  reads and verifies
//!    |   (index it)                                        |  its copy meanwhile
//!    | -- Blocks(.., STREAM_CODE, ..) -------------------> |
//!    | -- Blocks(.., STREAM_REF_CODE, ..) ---------------> |  frame ends; next
//!    | -- Blocks(.., STREAM_CODE, ..) -------------------> |  has it as prefix
//! ```
//!
//! Similar blocks elsewhere in DST (capability [`CAP_SIMILAR`], used only
//! with [`CAP_SUB_DELTA`] agreed too): when both ends set it, the target
//! may ask for the resemblance sketches of a run of missing blocks that
//! have no old version at the same place with `WantSketches(first, count)`
//! (at most a run of [`MAX_RUN_BYTES`]); the source answers with one
//! `Sketches(first, sketches)`: exactly `count` sketches of
//! [`SKETCH_LEN`](crate::wire::sketch::SKETCH_LEN) bytes
//! (`wire::sketch`). The target looks each one up in an index of DST's own
//! blocks; for a block that has a similar one there it sends the
//! `FetchDelta` above with the signature of *that* block, and rebuilds the
//! answer's body on it (checked against the block's key, refetched whole
//! with `Fetch` if it fails, as always); the others it fetches whole. The
//! source does not know which block the target chose: a `FetchDelta` means
//! the same as before. A `WantSketches` awaits one reply. `Sketches` with
//! another first block or count than asked is an error naming the frame.
//!
//! ```text
//!    | <------------------- WantSketches(first, n) ------- |  no old version
//!    | -- Sketches(first, n sketches) -------------------> |  at that place
//!    | <------------------- FetchDelta(block, sig of j) -- |  j: similar, in DST
//!    | -- Delta(block, codec, bitmap + changed subs) ----> |  rebuilt on j
//! ```
//!
//! The stream's level (capability [`CAP_STREAM_LEVELS`]): when both ends
//! set it, the source may end the stream's zstd frame (its end rides at the
//! start of the next piece) and begin a new frame, at another level, whose
//! prefix (zstd's `refPrefix`) is the last
//! [`LEVEL_PREFIX`](crate::wire::stream::LEVEL_PREFIX) bytes of the
//! stream's content so far: everything the stream's pieces decoded to, in
//! order. The target, whenever a frame ends, gives the next one exactly
//! those bytes. Every frame is bounded by the same window as the first,
//! and carries at least
//! [`LEVEL_FRAME_MIN`](crate::wire::stream::LEVEL_FRAME_MIN) bytes of
//! content before the next begins (each new frame costs the target a copy
//! of its tail): a closer frame is an error naming the stream. A stream
//! that began with a shared reference never starts a second frame.
//! `auto` raises the level where the link is steadily slow, and again
//! when a later measurement shows a higher level paying (at most five
//! rises, one per level), undoes a further rise that proved too costly
//! once, and drops it back to the first level at most once
//! (`wire::compress`, `wire::flow`; `SourceOptions::raise_levels`, on by
//! default): so at most eight frames.
//! The target relies on none of that: it follows any number of frames,
//! each bounded as above. No frame or field is added, and without the bit
//! the stream is one frame. Above
//! level 12 the source's new frame uses only the last 4 MiB of those bytes
//! as its prefix (cheaper to index); the target still gives it all of
//! them, which holds every match the source can find, at the same
//! distance.
//!
//! Receipts (capability [`CAP_RECEIPTS`]): when both ends set it, the
//! target sends `Received(bytes, waited)` now and then: how many bytes it
//! has read from the link so far, counted from the link's first byte (the
//! source's Hello included), and how many nanoseconds its reader has spent
//! waiting for them (rather than handing frames to a busy target). It
//! looks every [`RECEIPT_GAP`](crate::wire::receipts::RECEIPT_GAP) and
//! sends one when [`RECEIPT_EVERY`](crate::wire::receipts::RECEIPT_EVERY)
//! more bytes have arrived, or when any have and the link has since gone
//! quiet.
//! They are the link's clock as the target sees it, behind every buffer
//! between the ends (ssh's, the kernel's): the source's `auto` measures the
//! link by them (an interval in which the reader mostly waited is the
//! link's pace; one in which it mostly handed frames on is the target's),
//! and keeps its zstd stream at most about a second of the
//! link ahead of what arrived, so that a level chosen on that measurement
//! applies to the rest of the copy, not after megabytes compressed ahead
//! into buffers (`wire::receipts`). Receipts may come between any two
//! frames after the handshake, and are never answered. Nothing in them is
//! trusted beyond pacing: a count above what the source wrote is taken as
//! what it wrote, one below an earlier count is ignored, and a target that
//! acknowledges nothing more is no longer waited for after
//! [`GATE_GIVE_UP`](crate::wire::receipts::GATE_GIVE_UP). A `Received`
//! without the capability agreed, or of another length than 16 bytes, is
//! an error naming the frame.
//!
//! ```text
//!    | -- Blocks(...) -----------------------------------> |
//!    | <---------------------- Received(bytes, waited) --- |  every 16 KiB read,
//!    | -- Blocks(...) -----------------------------------> |  one per 20 ms at most
//! ```
//!
//! Keys only where the target may hold the block (capability
//! [`CAP_HELD_KEYS`], used only with [`CAP_SUB_GROUPS`] and
//! [`CAP_BLOCK_HINTS`] agreed too): when both ends set it, a target whose
//! DST holds nothing (no old copy, no base to fill it from) may send one
//! `Holds(range, k, count, bits)` after its `RefOffer` (if any) and before
//! any request: the keys its references hold, as a Golomb-Rice coded set
//! (`wire::held`). The source then answers each `WantChangedKeys` with
//! `HeldKeys(group, subs, differ, count, keyed, keys, run keys)` instead
//! of `ChangedKeys`: `differ` as `ChangedKeys` has it; over the `count`
//! blocks of the differing sub-groups a bit per block that is keyed (a
//! zero block, or one the set may hold), the keys of exactly those, then
//! a run key (`wire::held::run_key`) for each run of consecutive blocks
//! left unkeyed. The target settles keyed blocks as after `ChangedKeys`
//! and fetches each unkeyed run whole (`Fetch`, never a delta), checking
//! the run against its run key before writing any of it, as it checks a
//! block against its key; the group digest checks the group after, as
//! always, and a group that fails it is asked for again with every key
//! (`WantDigests`). A set that holds too little costs bytes (those blocks
//! are fetched), one that holds too much costs keys; neither a wrong
//! block. A `Holds` after a request, a second one, one without the
//! capability agreed, one holding more keys than
//! [`max_count`](crate::wire::held::max_count) allows for the image, or
//! one whose bits do not decode to exactly `count` values below `range`
//! is an error naming the set; so is a `HeldKeys` without a `Holds` sent,
//! or whose bitmaps, keys or run keys do not fit the group, and a
//! `ChangedKeys` after a `Holds` was sent.
//!
//! ```text
//!    | <---------------- Holds(range, k, count, bits) ---- |  DST holds nothing
//!    | <--------- WantChangedKeys(g, subs, DST's sig) ---- |
//!    | -- HeldKeys(g, differ, keyed, keys, run keys) ----> |  keys where held
//!    | <-------------------- Fetch(unkeyed run) ---------- |  checked by its
//!    | -- Blocks(...) -----------------------------------> |  run key
//! ```
//!
//! Versioning: [`VERSION`] changes whenever a frame's meaning changes or a
//! frame is added. An end accepts a peer one version older
//! ([`MIN_VERSION`]) and then speaks the older version: both ends agree on
//! `min(ours, theirs)` and neither sends a frame that version lacks. The
//! source sends its Hello first, announcing the *oldest* version it speaks
//! with [`CAP_NEXT_VERSION`] set when it also speaks the one after; the
//! target reads it and answers with the version it agreed on. So a
//! version-1 target, which demands an exact match and ignores unknown
//! capability bits, sees a version-1 Hello and serves a newer source in
//! version 1; a version-1 source (no such bit) is served by a newer target
//! in version 1; two current ends agree on the current version. Hosts can be
//! upgraded in either order. What a version-1 peer gets:
//! no `KeepAlive` frames, no flow-control window on the target's requests
//! (the source's request queue is then unbounded, as version 1 expects), and
//! no idle timeout on our side, because a version-1 peer is silent whenever
//! it is busy and cannot be told from a dead one; such a copy waits for a
//! silent peer as version 1 did. A peer two or more versions apart is refused
//! with both versions named. Optional features are capability bits in
//! Hello: a bit is used only when both ends set it, and unknown bits are
//! ignored, so adding a feature does not need a new version. The report in
//! `Done` is JSON whose fields all have defaults and which carries
//! `report_version`: a report from a peer one release apart (fields missing
//! or added) parses.

use std::io::{self, Read, Write};

use integer_encoding::VarInt;
use thiserror::Error;

use crate::blocks::digest::{Algorithm, Digest, Key, KEY_LEN};
use crate::blocks::layout::{Layout, Segment};
use crate::wire::sketch::SKETCH_LEN;
use crate::wire::subdelta::{HASH_LEN, SHORT_HASH_LEN};
use crate::wire::subgroup::{bitmap_len, ShortKey, HINT_LEN, SHORT_KEY_LEN};

pub const VERSION: u16 = 2;
/// Oldest peer version spoken (one release back).
pub const MIN_VERSION: u16 = 1;
/// First version with `KeepAlive` frames, idle timeouts and the request window.
pub const V_KEEPALIVE: u16 = 2;
/// Replies a version-2 target keeps outstanding at most, and the length of
/// the source's request queue.
pub const WINDOW: usize = 4096;
/// Capability: the source may run a live copy in passes.
pub const CAP_LIVE: u32 = 1;
/// Capability: `Blocks` payloads of codec
/// [`STREAM_CODE`](crate::wire::stream::STREAM_CODE) are pieces of one zstd
/// stream per copy, decompressed in the order the frames arrive, with a
/// window of at most 2^[`WINDOW_LOG_MAX`](crate::wire::stream::WINDOW_LOG_MAX)
/// bytes (`wire::stream`). Without it (a peer of the previous release) runs
/// are compressed one by one, as before.
pub const CAP_ZSTD_STREAM: u32 = 1 << 1;
/// Capability: the target may ask for a block with `FetchDelta`, sending a
/// signature of its old version, and the source answers with a `Delta`
/// (`wire::subdelta`). Without it (a peer of the previous release) every
/// missing block is fetched whole.
pub const CAP_SUB_DELTA: u32 = 1 << 2;
/// Capability: the target may ask for a group's keys with
/// `WantChangedKeys`, sending what DST holds at the group's place by
/// sub-group, and the source answers with `ChangedKeys`, the keys of the
/// sub-groups that differ only (`wire::subgroup`). Without it (a peer of
/// the previous release) every group's keys come whole (`WantDigests`).
pub const CAP_SUB_GROUPS: u32 = 1 << 3;
/// Capability: the target offers the references it holds (`RefOffer`) and
/// the source names one it holds too (`RefChosen`), which then starts the
/// copy's zstd stream as its prefix (`wire::stream`). Without it (a peer of
/// the previous release) neither frame is sent and the stream starts empty.
pub const CAP_SHARED_REF: u32 = 1 << 4;
/// Capability: the target may ask for the resemblance sketches of missing
/// blocks (`WantSketches`, answered by `Sketches`, `wire::sketch`) to find
/// a similar block in DST to ask a `FetchDelta` against. Without it (a peer
/// of the previous release) such blocks are fetched whole.
pub const CAP_SIMILAR: u32 = 1 << 5;
/// Capability: the source may end the zstd stream's frame between two
/// pieces and begin the next at another level, with the stream's last
/// [`LEVEL_PREFIX`](crate::wire::stream::LEVEL_PREFIX) bytes of content as
/// its prefix; the target gives each frame after the first the same bytes
/// (`wire::stream`). Without it (a peer of the previous release) the
/// stream keeps its first level.
pub const CAP_STREAM_LEVELS: u32 = 1 << 6;
/// Capability (used only with [`CAP_SUB_GROUPS`] agreed too): for a group
/// where DST holds data the target asks `WantChangedSubs` (8-byte
/// sub-group keys) instead of `WantChangedKeys`, the source answers `ChangedSubs`, the sub-groups
/// that differ without their keys; the target then sends
/// `WantHintedKeys`, a 2-byte hint of each of DST's blocks there, and the
/// source answers `HintedKeys`, the keys of the blocks whose hint differs
/// only (`wire::subgroup`). Without it (a peer of the previous release)
/// the exchange is `WantChangedKeys` / `ChangedKeys`.
pub const CAP_BLOCK_HINTS: u32 = 1 << 7;
/// Capability (used only with [`CAP_SUB_DELTA`] agreed too): the target
/// asks for a delta with `FetchDeltaShort`, whose signature holds
/// [`SHORT_HASH_LEN`](crate::wire::subdelta::SHORT_HASH_LEN) bytes per
/// sub-block instead of [`HASH_LEN`]; the answer is the same `Delta`.
/// Without it (a peer of the previous release) the target sends
/// `FetchDelta`.
pub const CAP_SHORT_SUB_HASHES: u32 = 1 << 8;
/// Capability: the target sends `Received(bytes, waited)` receipts of what it read
/// (`wire::receipts`); the source's `auto` paces and measures its stream by
/// them. Without it (a peer of the previous release) `auto` measures the
/// link by its own blocked writes, as before.
pub const CAP_RECEIPTS: u32 = 1 << 9;
/// Capability (used only with [`CAP_SHARED_REF`] and [`CAP_STREAM_LEVELS`]
/// agreed too): with a reference chosen, the stream does not begin with it;
/// the source sends one piece of codec
/// [`STREAM_REF_CODE`](crate::wire::stream::STREAM_REF_CODE) when it is
/// ready, whose new frame has the reference as its prefix (`wire::stream`),
/// possibly the first piece, possibly none. Without it (a peer of the
/// previous release) the stream begins with the reference, as before.
pub const CAP_LATE_REF: u32 = 1 << 10;
/// Capability: a target whose DST holds nothing yet may send the set of
/// keys its references hold (`Holds`, `wire::held`) before its first
/// request; the source then answers each `WantChangedKeys` with
/// `HeldKeys`: keys only for zero blocks and blocks the set may hold.
/// Without it (a peer of the previous release) every key is sent.
pub const CAP_HELD_KEYS: u32 = 1 << 11;
/// Capability (used only with [`CAP_SUB_DELTA`] and
/// [`CAP_SHORT_SUB_HASHES`] agreed too): the target may ask several deltas
/// in one `FetchDeltas` frame, and the source may answer several in one
/// `Deltas` frame, their bodies one piece. Without it (a peer of the
/// previous release) each delta is asked and answered in a frame of its
/// own.
pub const CAP_DELTA_BATCH: u32 = 1 << 12;
/// Capability: the source may answer a `Fetch` of several blocks with
/// several `Blocks` frames, consecutive runs from its first block on that
/// together cover it, in order (the target counts the request answered
/// with the last). Each run the target asked for unkeyed
/// ([`CAP_HELD_KEYS`]) lies whole in one of them. Without it (a peer of the
/// previous release) a `Fetch` is answered by one `Blocks` frame.
pub const CAP_SPLIT_RUNS: u32 = 1 << 13;
/// In a source's Hello: besides the version announced, it speaks the next
/// one too (see the versioning rule above). Never part of the agreed caps.
pub const CAP_NEXT_VERSION: u32 = 1 << 31;
const MAGIC: &[u8; 6] = b"XENMIG";
/// Largest payload accepted (a 4 MiB run of blocks plus headroom).
pub const MAX_FRAME: usize = 16 << 20;
/// Bytes of a Blocks payload before the block data.
const BLOCKS_HEAD: usize = 17;
/// Largest run of raw bytes one Blocks frame carries.
pub const MAX_RUN_BYTES: u64 = 4 << 20;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    ImageInfo = 2,
    Groups = 3,
    GroupsEnd = 4,
    WantDigests = 5,
    BlockDigests = 6,
    Fetch = 7,
    Blocks = 8,
    Done = 9,
    Bye = 10,
    Error = 11,
    PassBegin = 12,
    PassDone = 13,
    /// Version 2: nothing to say, still alive.
    KeepAlive = 14,
    /// Capability [`CAP_SUB_DELTA`]: one block, against the target's old version.
    FetchDelta = 15,
    Delta = 16,
    /// Capability [`CAP_SUB_GROUPS`]: one group's keys, against DST's sub-groups.
    WantChangedKeys = 17,
    ChangedKeys = 18,
    /// Capability [`CAP_SHARED_REF`]: the target's references, by digest.
    RefOffer = 19,
    RefChosen = 20,
    /// Capability [`CAP_SIMILAR`]: sketches of a run of missing blocks.
    WantSketches = 21,
    Sketches = 22,
    /// Capability [`CAP_BLOCK_HINTS`]: the sub-groups that differ, then
    /// the keys of their blocks whose hint differs.
    ChangedSubs = 23,
    WantHintedKeys = 24,
    HintedKeys = 25,
    WantChangedSubs = 26,
    /// Capability [`CAP_SHORT_SUB_HASHES`]: `FetchDelta` with short hashes.
    FetchDeltaShort = 27,
    /// Capability [`CAP_RECEIPTS`]: bytes the target has read so far.
    Received = 28,
    /// Capability [`CAP_HELD_KEYS`]: the keys a new DST's host holds, and
    /// `ChangedKeys` with keys only where the target may hold the block.
    Holds = 29,
    HeldKeys = 30,
    /// Capability [`CAP_DELTA_BATCH`]: several `FetchDeltaShort` in one
    /// frame, and several `Delta` answers as one piece.
    FetchDeltas = 31,
    Deltas = 32,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            ImageInfo,
            Groups,
            GroupsEnd,
            WantDigests,
            BlockDigests,
            Fetch,
            Blocks,
            Done,
            Bye,
            Error,
            PassBegin,
            PassDone,
            KeepAlive,
            FetchDelta,
            Delta,
            WantChangedKeys,
            ChangedKeys,
            RefOffer,
            RefChosen,
            WantSketches,
            Sketches,
            ChangedSubs,
            WantHintedKeys,
            HintedKeys,
            WantChangedSubs,
            FetchDeltaShort,
            Received,
            Holds,
            HeldKeys,
            FetchDeltas,
            Deltas,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Source = 1,
    Target = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u16,
        role: Role,
        caps: u32,
    },
    ImageInfo {
        algo: Algorithm,
        layout: Layout,
    },
    Groups {
        first: u64,
        digests: Vec<Digest>,
    },
    GroupsEnd {
        image_digest: Digest,
    },
    WantDigests {
        first_group: u64,
        count: u32,
    },
    BlockDigests {
        group: u64,
        keys: Vec<Key>,
    },
    Fetch {
        first_block: u64,
        count: u32,
    },
    Blocks {
        first_block: u64,
        count: u32,
        codec: u8,
        raw_len: u32,
        payload: Vec<u8>,
    },
    Done {
        report: String,
    },
    /// Ends a copy; `downtime_ns` is the freeze-to-thaw time of a live copy.
    Bye {
        downtime_ns: u64,
    },
    PassBegin {
        pass: u32,
        final_pass: bool,
        changed_blocks: u64,
    },
    PassDone {
        pass: u32,
        stale_groups: Vec<u64>,
    },
    Error {
        message: String,
    },
    KeepAlive,
    /// Bytes the target has read from the link so far, and nanoseconds
    /// its reader spent waiting for them ([`CAP_RECEIPTS`]).
    Received {
        bytes: u64,
        waited_ns: u64,
    },
    /// Block `block`, whose old version has signature `sig`
    /// ([`HASH_LEN`](crate::wire::subdelta::HASH_LEN) bytes per sub-block).
    FetchDelta {
        block: u64,
        sig: Vec<u8>,
    },
    /// `FetchDelta` with a signature of
    /// [`SHORT_HASH_LEN`](crate::wire::subdelta::SHORT_HASH_LEN) bytes per
    /// sub-block (`wire::subdelta::short_signature`).
    FetchDeltaShort {
        block: u64,
        sig: Vec<u8>,
    },
    /// The answer to a `FetchDelta`: `payload` decodes with `codec` to a
    /// `raw_len`-byte delta body (`wire::subdelta::apply`).
    Delta {
        block: u64,
        codec: u8,
        raw_len: u32,
        payload: Vec<u8>,
    },
    /// Several `FetchDeltaShort` ([`CAP_DELTA_BATCH`]): `blocks` strictly
    /// ascending, `sigs` their short signatures one after another, each as
    /// long as its block's sub-blocks call for (the source splits them by
    /// the image's layout, which this frame does not carry).
    FetchDeltas {
        blocks: Vec<u64>,
        sigs: Vec<u8>,
    },
    /// Several `Delta` answers as one piece ([`CAP_DELTA_BATCH`]):
    /// `payload` decodes with `codec` to `raw_len` bytes, the delta bodies
    /// of `blocks` (strictly ascending) one after another, each as long as
    /// its bitmap says (`wire::subdelta::body_len`).
    Deltas {
        codec: u8,
        raw_len: u32,
        blocks: Vec<u64>,
        payload: Vec<u8>,
    },
    /// The keys of group `group` that differ from what DST holds there:
    /// `subs` sub-groups, bit k of `zero` set where DST's sub-group k is
    /// all zeros, and the sub-group key of each other one
    /// (`wire::subgroup::Signature`).
    WantChangedKeys {
        group: u64,
        subs: u16,
        zero: Vec<u8>,
        keys: Vec<Key>,
    },
    /// The answer to a `WantChangedKeys`: bit k of `differ` set where
    /// sub-group k differs, and the keys of exactly those sub-groups' blocks.
    ChangedKeys {
        group: u64,
        subs: u16,
        differ: Vec<u8>,
        keys: Vec<Key>,
    },
    /// The target's references that may serve as the stream's prefix:
    /// image digest and size in bytes of each.
    RefOffer {
        refs: Vec<(Digest, u64)>,
    },
    /// The source's answer: the digest of the offered reference it holds
    /// too, or None.
    RefChosen {
        chosen: Option<Digest>,
    },
    /// The resemblance sketches of blocks `first_block..+count`.
    WantSketches {
        first_block: u64,
        count: u32,
    },
    /// The answer to a `WantSketches`: one sketch per block asked, in order.
    Sketches {
        first_block: u64,
        sketches: Vec<[u8; SKETCH_LEN]>,
    },
    /// `WantChangedKeys` with [`CAP_BLOCK_HINTS`] agreed: the same
    /// signature with sub-group keys of
    /// [`SHORT_KEY_LEN`](crate::wire::subgroup::SHORT_KEY_LEN) bytes.
    WantChangedSubs {
        group: u64,
        subs: u16,
        zero: Vec<u8>,
        keys: Vec<ShortKey>,
    },
    /// The answer to a `WantChangedSubs`: bit k of `differ` set where
    /// sub-group k of the `subs` differs; no keys.
    ChangedSubs {
        group: u64,
        subs: u16,
        differ: Vec<u8>,
    },
    /// The keys of group `group`'s blocks in the sub-groups marked in
    /// `differ` (as `ChangedSubs` said) that differ from DST's: bit k of
    /// `zero` set where DST's sub-group k is all zeros, and the
    /// [`HINT_LEN`](crate::wire::subgroup::HINT_LEN)-byte hint of each of
    /// DST's blocks in the other marked sub-groups, in order.
    WantHintedKeys {
        group: u64,
        subs: u16,
        differ: Vec<u8>,
        zero: Vec<u8>,
        hints: Vec<u8>,
    },
    /// The answer to a `WantHintedKeys`: over the `count` blocks of the
    /// marked sub-groups, bit n of `changed` set where the n-th differs
    /// from DST's, and the keys of exactly those.
    HintedKeys {
        group: u64,
        count: u32,
        changed: Vec<u8>,
        keys: Vec<Key>,
    },
    /// The keys the target's references hold, as a Golomb-Rice coded set
    /// (`wire::held::Encoded`): `count` values in `[0, range)`, parameter
    /// `k`.
    Holds {
        range: u64,
        k: u8,
        count: u32,
        bits: Vec<u8>,
    },
    /// The answer to a `WantChangedKeys` once the target sent `Holds`:
    /// bit k of `differ` set where sub-group k differs; over the `count`
    /// blocks of those sub-groups, bit n of `keyed` set where the n-th is
    /// zero or may be held, the keys of exactly those, then a run key
    /// (`wire::held::run_key`) per run of consecutive blocks not keyed.
    HeldKeys {
        group: u64,
        subs: u16,
        differ: Vec<u8>,
        count: u32,
        keyed: Vec<u8>,
        keys: Vec<Key>,
        run_keys: Vec<Key>,
    },
}

/// Bytes of one `RefOffer` entry (digest, size).
const REF_ENTRY: usize = 40;

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("the peer closed the connection {0}")]
    Eof(&'static str),
    #[error("connection to the peer failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer sent a frame of unknown kind {0} (not a xenmig peer, or garbage on the stream)")]
    UnknownKind(u8),
    #[error("the peer sent a {kind:?} frame of {len} bytes, more than the {max} allowed")]
    TooLarge { kind: Kind, len: usize, max: usize },
    #[error("malformed {kind:?} frame: {what}")]
    Malformed { kind: Kind, what: String },
    #[error("protocol version mismatch: this end speaks {min}..={ours}, the peer {theirs}; install xenmig releases at most one apart on both hosts")]
    Version { ours: u16, min: u16, theirs: u16 },
    #[error("the {peer} sent nothing for {silent_secs:.1} s (idle timeout {limit_secs} s): it stopped responding or the link is down")]
    IdleTimeout { peer: &'static str, silent_secs: f64, limit_secs: u64 },
    #[error("the peer reported an error: {0}")]
    Remote(String),
    #[error("unexpected {got:?} frame while {state}")]
    Unexpected { got: Kind, state: &'static str },
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

/// A strictly ascending list of blocks ([`CAP_DELTA_BATCH`]'s frames): its
/// length, the first block, then each gap to the next, as LEB128 varints
/// (a batch's blocks lie close together: one or two bytes a block, where a
/// frame of its own cost 13 bytes of header and number).
fn put_blocks(b: &mut Vec<u8>, blocks: &[u64]) {
    debug_assert!(blocks.windows(2).all(|w| w[0] < w[1]), "blocks ascending");
    b.extend_from_slice(&(blocks.len() as u64).encode_var_vec());
    let mut prev = None;
    for &i in blocks {
        let v = match prev {
            None => i,
            Some(p) => i - p,
        };
        b.extend_from_slice(&v.encode_var_vec());
        prev = Some(i);
    }
}

/// Most blocks one `FetchDeltas` or `Deltas` names: a batch's bodies fit
/// one run ([`MAX_RUN_BYTES`]), at least a bitmap byte and a sub-block
/// each, so 8,176 for the smallest blocks; this bound keeps what a peer's
/// frame makes this end allocate for its block list to half a megabyte.
pub const MAX_BATCH_BLOCKS: u64 = 1 << 16;

/// Read what [`put_blocks`] wrote at the start of `p`: the blocks and the
/// bytes they took. Every count is checked against the bytes present and
/// [`MAX_BATCH_BLOCKS`] before anything is allocated; a gap of 0 (not
/// ascending) or a block past 2^64 is an error.
fn get_blocks(p: &[u8]) -> Result<(Vec<u64>, usize), String> {
    let var = |at: usize, what: &str| {
        u64::decode_var(p.get(at..).unwrap_or_default())
            .ok_or_else(|| format!("{what} at byte {at} is cut short or overlong"))
    };
    let (n, mut at) = var(0, "the count of blocks")?;
    if n == 0 {
        return Err("no blocks".into());
    }
    if n > MAX_BATCH_BLOCKS {
        return Err(format!("claims {n} blocks, more than the {MAX_BATCH_BLOCKS} a batch may hold"));
    }
    // (Each block takes at least one byte.)
    if n > (p.len() - at) as u64 {
        return Err(format!("claims {n} blocks in {} bytes", p.len() - at));
    }
    let mut blocks: Vec<u64> = Vec::with_capacity(n as usize);
    for k in 0..n {
        let (v, used) = var(at, "a block number")?;
        at += used;
        let block = match blocks.last() {
            None => v,
            Some(&prev) if v == 0 => return Err(format!("block {prev} twice (block {k} of {n}): not ascending")),
            Some(&prev) => prev.checked_add(v).ok_or_else(|| format!("block {k} of {n} lies past 2^64"))?,
        };
        blocks.push(block);
    }
    Ok((blocks, at))
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::ImageInfo { .. } => Kind::ImageInfo,
            Message::Groups { .. } => Kind::Groups,
            Message::GroupsEnd { .. } => Kind::GroupsEnd,
            Message::WantDigests { .. } => Kind::WantDigests,
            Message::BlockDigests { .. } => Kind::BlockDigests,
            Message::Fetch { .. } => Kind::Fetch,
            Message::Blocks { .. } => Kind::Blocks,
            Message::Done { .. } => Kind::Done,
            Message::Bye { .. } => Kind::Bye,
            Message::PassBegin { .. } => Kind::PassBegin,
            Message::PassDone { .. } => Kind::PassDone,
            Message::Error { .. } => Kind::Error,
            Message::KeepAlive => Kind::KeepAlive,
            Message::FetchDelta { .. } => Kind::FetchDelta,
            Message::Delta { .. } => Kind::Delta,
            Message::WantChangedKeys { .. } => Kind::WantChangedKeys,
            Message::ChangedKeys { .. } => Kind::ChangedKeys,
            Message::RefOffer { .. } => Kind::RefOffer,
            Message::RefChosen { .. } => Kind::RefChosen,
            Message::WantSketches { .. } => Kind::WantSketches,
            Message::Sketches { .. } => Kind::Sketches,
            Message::ChangedSubs { .. } => Kind::ChangedSubs,
            Message::WantChangedSubs { .. } => Kind::WantChangedSubs,
            Message::FetchDeltaShort { .. } => Kind::FetchDeltaShort,
            Message::WantHintedKeys { .. } => Kind::WantHintedKeys,
            Message::HintedKeys { .. } => Kind::HintedKeys,
            Message::Received { .. } => Kind::Received,
            Message::Holds { .. } => Kind::Holds,
            Message::HeldKeys { .. } => Kind::HeldKeys,
            Message::FetchDeltas { .. } => Kind::FetchDeltas,
            Message::Deltas { .. } => Kind::Deltas,
        }
    }

    /// The whole frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        let (mut head, tail) = self.encode_parts();
        head.extend_from_slice(tail);
        head
    }

    /// The frame as a head and a trailing payload, so that the bulk of a
    /// Blocks frame is written from where it lies instead of being copied.
    fn encode_parts(&self) -> (Vec<u8>, &[u8]) {
        let mut tail: &[u8] = &[];
        let mut b = vec![self.kind() as u8, 0, 0, 0, 0];
        match self {
            Message::Hello { version, role, caps } => {
                b.extend_from_slice(MAGIC);
                b.extend_from_slice(&version.to_le_bytes());
                b.push(*role as u8);
                put_u32(&mut b, *caps);
            }
            Message::ImageInfo { algo, layout } => {
                b.push(algo.code());
                put_u64(&mut b, layout.size);
                put_u32(&mut b, layout.block_size);
                put_u32(&mut b, layout.segments.len() as u32);
                for s in &layout.segments {
                    put_u64(&mut b, s.start);
                    put_u64(&mut b, s.len);
                }
            }
            Message::Groups { first, digests } => {
                put_u64(&mut b, *first);
                for d in digests {
                    b.extend_from_slice(d);
                }
            }
            Message::GroupsEnd { image_digest } => b.extend_from_slice(image_digest),
            Message::WantDigests { first_group, count } => {
                put_u64(&mut b, *first_group);
                put_u32(&mut b, *count);
            }
            Message::BlockDigests { group, keys } => {
                put_u64(&mut b, *group);
                for k in keys {
                    b.extend_from_slice(k);
                }
            }
            Message::Fetch { first_block, count } | Message::WantSketches { first_block, count } => {
                put_u64(&mut b, *first_block);
                put_u32(&mut b, *count);
            }
            Message::Sketches { first_block, sketches } => {
                put_u64(&mut b, *first_block);
                for s in sketches {
                    b.extend_from_slice(s);
                }
            }
            Message::Blocks { first_block, count, codec, raw_len, payload } => {
                put_u64(&mut b, *first_block);
                put_u32(&mut b, *count);
                b.push(*codec);
                put_u32(&mut b, *raw_len);
                tail = payload;
            }
            Message::Done { report } => b.extend_from_slice(report.as_bytes()),
            Message::Bye { downtime_ns } => put_u64(&mut b, *downtime_ns),
            Message::PassBegin { pass, final_pass, changed_blocks } => {
                put_u32(&mut b, *pass);
                b.push(*final_pass as u8);
                put_u64(&mut b, *changed_blocks);
            }
            Message::PassDone { pass, stale_groups } => {
                put_u32(&mut b, *pass);
                for g in stale_groups {
                    put_u64(&mut b, *g);
                }
            }
            Message::Error { message } => b.extend_from_slice(message.as_bytes()),
            Message::KeepAlive => {}
            Message::Received { bytes, waited_ns } => {
                put_u64(&mut b, *bytes);
                put_u64(&mut b, *waited_ns);
            }
            Message::FetchDelta { block, sig } | Message::FetchDeltaShort { block, sig } => {
                put_u64(&mut b, *block);
                b.extend_from_slice(sig);
            }
            Message::Delta { block, codec, raw_len, payload } => {
                put_u64(&mut b, *block);
                b.push(*codec);
                put_u32(&mut b, *raw_len);
                tail = payload;
            }
            Message::FetchDeltas { blocks, sigs } => {
                put_blocks(&mut b, blocks);
                b.extend_from_slice(sigs);
            }
            Message::Deltas { codec, raw_len, blocks, payload } => {
                b.push(*codec);
                put_u32(&mut b, *raw_len);
                put_blocks(&mut b, blocks);
                tail = payload;
            }
            Message::WantChangedKeys { group, subs, zero: bits, keys }
            | Message::ChangedKeys { group, subs, differ: bits, keys } => {
                put_u64(&mut b, *group);
                b.extend_from_slice(&subs.to_le_bytes());
                b.extend_from_slice(bits);
                for k in keys {
                    b.extend_from_slice(k);
                }
            }
            Message::RefOffer { refs } => {
                for (d, size) in refs {
                    b.extend_from_slice(d);
                    put_u64(&mut b, *size);
                }
            }
            Message::RefChosen { chosen } => {
                if let Some(d) = chosen {
                    b.extend_from_slice(d);
                }
            }
            Message::WantChangedSubs { group, subs, zero, keys } => {
                put_u64(&mut b, *group);
                b.extend_from_slice(&subs.to_le_bytes());
                b.extend_from_slice(zero);
                for k in keys {
                    b.extend_from_slice(k);
                }
            }
            Message::ChangedSubs { group, subs, differ } => {
                put_u64(&mut b, *group);
                b.extend_from_slice(&subs.to_le_bytes());
                b.extend_from_slice(differ);
            }
            Message::WantHintedKeys { group, subs, differ, zero, hints } => {
                put_u64(&mut b, *group);
                b.extend_from_slice(&subs.to_le_bytes());
                b.extend_from_slice(differ);
                b.extend_from_slice(zero);
                b.extend_from_slice(hints);
            }
            Message::HintedKeys { group, count, changed, keys } => {
                put_u64(&mut b, *group);
                put_u32(&mut b, *count);
                b.extend_from_slice(changed);
                for k in keys {
                    b.extend_from_slice(k);
                }
            }
            Message::Holds { range, k, count, bits } => {
                put_u64(&mut b, *range);
                b.push(*k);
                put_u32(&mut b, *count);
                b.extend_from_slice(bits);
            }
            Message::HeldKeys { group, subs, differ, count, keyed, keys, run_keys } => {
                put_u64(&mut b, *group);
                b.extend_from_slice(&subs.to_le_bytes());
                b.extend_from_slice(differ);
                put_u32(&mut b, *count);
                b.extend_from_slice(keyed);
                for k in keys.iter().chain(run_keys) {
                    b.extend_from_slice(k);
                }
            }
        }
        let len = (b.len() - 5 + tail.len()) as u32;
        b[1..5].copy_from_slice(&len.to_le_bytes());
        (b, tail)
    }

    /// Decode one payload of a known kind; every length is checked.
    pub fn decode(kind: Kind, p: &[u8]) -> Result<Message, ProtocolError> {
        let bad = |what: String| ProtocolError::Malformed { kind, what };
        let exact = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(bad(format!("{} bytes, expected {n}", p.len())))
            }
        };
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap());
        Ok(match kind {
            Kind::Hello => {
                exact(13)?;
                if &p[..6] != MAGIC {
                    return Err(bad("no XENMIG magic (is the remote command really xenmig?)".into()));
                }
                let role = match p[8] {
                    1 => Role::Source,
                    2 => Role::Target,
                    r => return Err(bad(format!("unknown role {r}"))),
                };
                Message::Hello { version: u16::from_le_bytes([p[6], p[7]]), role, caps: u32_at(9) }
            }
            Kind::ImageInfo => {
                if p.len() < 17 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let algo =
                    Algorithm::from_code(p[0]).ok_or_else(|| bad(format!("unknown digest algorithm {}", p[0])))?;
                let nseg = u32_at(13) as usize;
                exact(17usize.saturating_add(nseg.saturating_mul(16)))?;
                let segs =
                    (0..nseg).map(|i| Segment { start: u64_at(17 + 16 * i), len: u64_at(25 + 16 * i) }).collect();
                let layout = Layout::from_segments(u64_at(1), u32_at(9), segs).map_err(bad)?;
                Message::ImageInfo { algo, layout }
            }
            Kind::Groups => {
                if p.len() < 8 || (p.len() - 8) % 32 != 0 {
                    return Err(bad(format!("{} bytes is not 8 + n x 32", p.len())));
                }
                let digests = p[8..].chunks_exact(32).map(|c| c.try_into().unwrap()).collect();
                Message::Groups { first: u64_at(0), digests }
            }
            Kind::GroupsEnd => {
                exact(32)?;
                Message::GroupsEnd { image_digest: p.try_into().unwrap() }
            }
            Kind::WantDigests => {
                exact(12)?;
                Message::WantDigests { first_group: u64_at(0), count: u32_at(8) }
            }
            Kind::BlockDigests => {
                if p.len() < 8 || (p.len() - 8) % KEY_LEN != 0 {
                    return Err(bad(format!("{} bytes is not 8 + n x {KEY_LEN}", p.len())));
                }
                let keys = p[8..].chunks_exact(KEY_LEN).map(|c| c.try_into().unwrap()).collect();
                Message::BlockDigests { group: u64_at(0), keys }
            }
            Kind::Fetch => {
                exact(12)?;
                Message::Fetch { first_block: u64_at(0), count: u32_at(8) }
            }
            Kind::Blocks => {
                if p.len() < BLOCKS_HEAD {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let raw_len = u32_at(13);
                if raw_len as u64 > MAX_RUN_BYTES {
                    return Err(bad(format!("claims {raw_len} raw bytes, more than a run may hold")));
                }
                Message::Blocks {
                    first_block: u64_at(0),
                    count: u32_at(8),
                    codec: p[12],
                    raw_len,
                    payload: p[17..].to_vec(),
                }
            }
            Kind::Done => {
                Message::Done { report: String::from_utf8(p.to_vec()).map_err(|_| bad("report is not UTF-8".into()))? }
            }
            Kind::Bye => {
                exact(8)?;
                Message::Bye { downtime_ns: u64_at(0) }
            }
            Kind::PassBegin => {
                exact(13)?;
                let final_pass = match p[4] {
                    0 => false,
                    1 => true,
                    v => return Err(bad(format!("final flag {v}"))),
                };
                Message::PassBegin { pass: u32_at(0), final_pass, changed_blocks: u64_at(5) }
            }
            Kind::PassDone => {
                if p.len() < 4 || (p.len() - 4) % 8 != 0 {
                    return Err(bad(format!("{} bytes is not 4 + n x 8", p.len())));
                }
                let stale_groups = (0..(p.len() - 4) / 8).map(|i| u64_at(4 + 8 * i)).collect();
                Message::PassDone { pass: u32_at(0), stale_groups }
            }
            Kind::Error => Message::Error { message: String::from_utf8_lossy(p).into_owned() },
            Kind::KeepAlive => {
                exact(0)?;
                Message::KeepAlive
            }
            Kind::Received => {
                exact(16)?;
                Message::Received { bytes: u64_at(0), waited_ns: u64_at(8) }
            }
            Kind::FetchDelta => {
                if p.len() < 8 || (p.len() - 8) % HASH_LEN != 0 {
                    return Err(bad(format!("{} bytes is not 8 + n x {HASH_LEN}", p.len())));
                }
                Message::FetchDelta { block: u64_at(0), sig: p[8..].to_vec() }
            }
            Kind::FetchDeltaShort => {
                if p.len() < 8 || (p.len() - 8) % SHORT_HASH_LEN != 0 {
                    return Err(bad(format!("{} bytes is not 8 + n x {SHORT_HASH_LEN}", p.len())));
                }
                Message::FetchDeltaShort { block: u64_at(0), sig: p[8..].to_vec() }
            }
            Kind::Delta => {
                if p.len() < 13 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let raw_len = u32_at(9);
                if raw_len as u64 > MAX_RUN_BYTES {
                    return Err(bad(format!("claims {raw_len} raw bytes, more than a block may hold")));
                }
                Message::Delta { block: u64_at(0), codec: p[8], raw_len, payload: p[13..].to_vec() }
            }
            Kind::FetchDeltas => {
                let (blocks, at) = get_blocks(p).map_err(bad)?;
                if (p.len() - at) % SHORT_HASH_LEN != 0 {
                    return Err(bad(format!("{} bytes of signatures is not n x {SHORT_HASH_LEN}", p.len() - at)));
                }
                Message::FetchDeltas { blocks, sigs: p[at..].to_vec() }
            }
            Kind::Deltas => {
                if p.len() < 5 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let raw_len = u32_at(1);
                if raw_len as u64 > MAX_RUN_BYTES {
                    return Err(bad(format!("claims {raw_len} raw bytes, more than a run may hold")));
                }
                let (blocks, at) = get_blocks(&p[5..]).map_err(bad)?;
                Message::Deltas { codec: p[0], raw_len, blocks, payload: p[5 + at..].to_vec() }
            }
            Kind::WantChangedKeys | Kind::ChangedKeys => {
                // group, sub-group count, a bit per sub-group, then keys.
                if p.len() < 10 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let subs = u16::from_le_bytes([p[8], p[9]]);
                let bits_end = 10 + bitmap_len(subs as usize);
                if p.len() < bits_end || (p.len() - bits_end) % KEY_LEN != 0 {
                    return Err(bad(format!(
                        "{} bytes is not 10 + {} bytes of bitmap for {subs} sub-groups + n x {KEY_LEN}",
                        p.len(),
                        bits_end - 10
                    )));
                }
                let (group, bits) = (u64_at(0), p[10..bits_end].to_vec());
                let keys = p[bits_end..].chunks_exact(KEY_LEN).map(|c| c.try_into().unwrap()).collect();
                if kind == Kind::WantChangedKeys {
                    Message::WantChangedKeys { group, subs, zero: bits, keys }
                } else {
                    Message::ChangedKeys { group, subs, differ: bits, keys }
                }
            }
            Kind::RefOffer => {
                if p.len() % REF_ENTRY != 0 {
                    return Err(bad(format!("{} bytes is not n x {REF_ENTRY}", p.len())));
                }
                let refs = p
                    .chunks_exact(REF_ENTRY)
                    .map(|c| (c[..32].try_into().unwrap(), u64::from_le_bytes(c[32..].try_into().unwrap())))
                    .collect();
                Message::RefOffer { refs }
            }
            Kind::RefChosen => match p.len() {
                0 => Message::RefChosen { chosen: None },
                32 => Message::RefChosen { chosen: Some(p.try_into().unwrap()) },
                n => return Err(bad(format!("{n} bytes, expected 0 or 32"))),
            },
            Kind::WantSketches => {
                exact(12)?;
                Message::WantSketches { first_block: u64_at(0), count: u32_at(8) }
            }
            Kind::Sketches => {
                if p.len() < 8 || (p.len() - 8) % SKETCH_LEN != 0 {
                    return Err(bad(format!("{} bytes is not 8 + n x {SKETCH_LEN}", p.len())));
                }
                let sketches = p[8..].chunks_exact(SKETCH_LEN).map(|c| c.try_into().unwrap()).collect();
                Message::Sketches { first_block: u64_at(0), sketches }
            }
            Kind::WantChangedSubs => {
                if p.len() < 10 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let subs = u16::from_le_bytes([p[8], p[9]]);
                let keys_at = 10 + bitmap_len(subs as usize);
                if p.len() < keys_at || (p.len() - keys_at) % SHORT_KEY_LEN != 0 {
                    return Err(bad(format!(
                        "{} bytes is not 10 + {} bytes of bitmap for {subs} sub-groups + n x {SHORT_KEY_LEN}",
                        p.len(),
                        keys_at - 10
                    )));
                }
                let keys = p[keys_at..].chunks_exact(SHORT_KEY_LEN).map(|c| c.try_into().unwrap()).collect();
                Message::WantChangedSubs { group: u64_at(0), subs, zero: p[10..keys_at].to_vec(), keys }
            }
            Kind::ChangedSubs => {
                if p.len() < 10 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let subs = u16::from_le_bytes([p[8], p[9]]);
                exact(10 + bitmap_len(subs as usize))?;
                Message::ChangedSubs { group: u64_at(0), subs, differ: p[10..].to_vec() }
            }
            Kind::WantHintedKeys => {
                // group, sub-group count, two bitmaps of a bit per sub-group, hints.
                if p.len() < 10 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let subs = u16::from_le_bytes([p[8], p[9]]);
                let bits = bitmap_len(subs as usize);
                let hints_at = 10 + 2 * bits;
                if p.len() < hints_at || (p.len() - hints_at) % HINT_LEN != 0 {
                    return Err(bad(format!(
                        "{} bytes is not 10 + 2 x {bits} bytes of bitmaps for {subs} sub-groups + n x {HINT_LEN}",
                        p.len()
                    )));
                }
                Message::WantHintedKeys {
                    group: u64_at(0),
                    subs,
                    differ: p[10..10 + bits].to_vec(),
                    zero: p[10 + bits..hints_at].to_vec(),
                    hints: p[hints_at..].to_vec(),
                }
            }
            Kind::HintedKeys => {
                // group, blocks covered, a bit per block covered, keys.
                if p.len() < 12 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let count = u32_at(8);
                let keys_at = 12usize.saturating_add((count as usize).div_ceil(8));
                if p.len() < keys_at || (p.len() - keys_at) % KEY_LEN != 0 {
                    return Err(bad(format!(
                        "{} bytes is not 12 + a bitmap of {count} blocks + n x {KEY_LEN}",
                        p.len()
                    )));
                }
                let keys = p[keys_at..].chunks_exact(KEY_LEN).map(|c| c.try_into().unwrap()).collect();
                Message::HintedKeys { group: u64_at(0), count, changed: p[12..keys_at].to_vec(), keys }
            }
            Kind::Holds => {
                if p.len() < 13 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                Message::Holds { range: u64_at(0), k: p[8], count: u32_at(9), bits: p[13..].to_vec() }
            }
            Kind::HeldKeys => {
                // group, sub-group count, a bit per sub-group, blocks
                // covered, a bit per block covered, a key per bit set, run
                // keys.
                if p.len() < 10 {
                    return Err(bad(format!("{} bytes, shorter than its header", p.len())));
                }
                let subs = u16::from_le_bytes([p[8], p[9]]);
                let count_at = 10 + bitmap_len(subs as usize);
                if p.len() < count_at + 4 {
                    return Err(bad(format!("{} bytes, shorter than its bitmap of {subs} sub-groups", p.len())));
                }
                let count = u32_at(count_at);
                let keys_at = (count_at + 4).saturating_add((count as usize).div_ceil(8));
                if p.len() < keys_at || (p.len() - keys_at) % KEY_LEN != 0 {
                    return Err(bad(format!(
                        "{} bytes is not 10 + a bitmap of {subs} sub-groups + 4 + a bitmap of {count} blocks + n x {KEY_LEN}",
                        p.len()
                    )));
                }
                let keyed = p[count_at + 4..keys_at].to_vec();
                let nkeys = keyed.iter().map(|b| b.count_ones() as usize).sum::<usize>();
                let mut all = p[keys_at..].chunks_exact(KEY_LEN).map(|c| c.try_into().unwrap());
                if all.len() < nkeys {
                    return Err(bad(format!("{} keys, where its bitmap marks {nkeys}", all.len())));
                }
                let keys = all.by_ref().take(nkeys).collect();
                Message::HeldKeys {
                    group: u64_at(0),
                    subs,
                    differ: p[10..count_at].to_vec(),
                    count,
                    keyed,
                    keys,
                    run_keys: all.collect(),
                }
            }
        })
    }
}

/// Read one frame, skipping keep-alives. `context` names what was
/// expected, for EOF errors.
pub fn read_message(r: &mut impl Read, context: &'static str) -> Result<Message, ProtocolError> {
    loop {
        match read_frame(r, context)? {
            Message::KeepAlive => continue,
            m => return Ok(m),
        }
    }
}

/// Read one frame, keep-alives included.
pub fn read_frame(r: &mut impl Read, context: &'static str) -> Result<Message, ProtocolError> {
    let mut h = [0u8; 5];
    read_exact_or_eof(r, &mut h, context)?;
    let kind = Kind::from_u8(h[0]).ok_or(ProtocolError::UnknownKind(h[0]))?;
    let len = u32::from_le_bytes(h[1..5].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge { kind, len, max: MAX_FRAME });
    }
    if kind == Kind::Blocks && len >= BLOCKS_HEAD {
        // Read the bulk straight into the payload buffer it will stay in.
        let mut head = [0u8; BLOCKS_HEAD];
        read_exact_or_eof(r, &mut head, "in the middle of a frame")?;
        let mut payload = vec![0u8; len - BLOCKS_HEAD];
        read_exact_or_eof(r, &mut payload, "in the middle of a frame")?;
        return match Message::decode(kind, &head)? {
            Message::Blocks { first_block, count, codec, raw_len, .. } => {
                Ok(Message::Blocks { first_block, count, codec, raw_len, payload })
            }
            _ => unreachable!("a Blocks head decodes as Blocks"),
        };
    }
    let mut p = vec![0u8; len];
    read_exact_or_eof(r, &mut p, "in the middle of a frame")?;
    match Message::decode(kind, &p)? {
        Message::Error { message } => Err(ProtocolError::Remote(message)),
        m => Ok(m),
    }
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8], context: &'static str) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Eof(context),
        _ => ProtocolError::Io(e),
    })
}

pub fn write_message(w: &mut impl Write, m: &Message) -> Result<(), ProtocolError> {
    let (head, tail) = m.encode_parts();
    tally::count(m.kind(), head.len() + tail.len(), tail.len());
    w.write_all(&head)?;
    w.write_all(tail)?;
    Ok(())
}

/// What this process wrote, by frame kind: a measurement aid (logged at
/// debug level after a local copy, where both ends are this process), so
/// that where the protocol's bytes go can be counted exactly.
pub mod tally {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    use super::Kind;

    const KINDS: usize = 64;
    static FRAMES: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];
    static BYTES: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];
    /// Bytes of the bulk payload (Blocks and Delta data) within `BYTES`.
    static BULK: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];

    pub(super) fn count(kind: Kind, bytes: usize, bulk: usize) {
        let k = kind as usize % KINDS;
        FRAMES[k].fetch_add(1, Relaxed);
        BYTES[k].fetch_add(bytes as u64, Relaxed);
        BULK[k].fetch_add(bulk as u64, Relaxed);
    }

    /// One kind's frames written so far.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Line {
        pub kind: Kind,
        pub frames: u64,
        /// Whole frames, headers included.
        pub bytes: u64,
        /// Of which bulk payload (what the codec made of the blocks).
        pub bulk: u64,
    }

    /// Every kind written at least once since the process started.
    pub fn lines() -> Vec<Line> {
        (0..KINDS as u8)
            .filter_map(Kind::from_u8)
            .map(|kind| {
                let k = kind as usize;
                Line {
                    kind,
                    frames: FRAMES[k].load(Relaxed),
                    bytes: BYTES[k].load(Relaxed),
                    bulk: BULK[k].load(Relaxed),
                }
            })
            .filter(|l| l.frames > 0)
            .collect()
    }
}

/// What the handshake agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// min(ours, theirs): the version both ends speak from now on.
    pub version: u16,
    /// Capabilities both ends set.
    pub caps: u32,
}

impl Agreed {
    /// Whether keep-alives, idle timeouts and the request window are on.
    pub fn keepalive(&self) -> bool {
        self.version >= V_KEEPALIVE
    }

    /// Whether deltas are asked and answered in batches
    /// ([`CAP_DELTA_BATCH`], with the capabilities it builds on).
    pub fn delta_batch(&self) -> bool {
        let needs = CAP_DELTA_BATCH | CAP_SUB_DELTA | CAP_SHORT_SUB_HASHES;
        self.caps & needs == needs
    }
}

/// Exchange Hello frames and agree on a version: the source sends first;
/// the target reads the source's Hello and answers with the agreed version
/// (so a version-1 source, which wants an exact match, accepts it).
pub fn handshake(r: &mut impl Read, w: &mut impl Write, role: Role, caps: u32) -> Result<Agreed, ProtocolError> {
    handshake_as(r, w, role, caps, VERSION)
}

/// [`handshake`] announcing `ours` instead of [`VERSION`] (tests simulate
/// older peers with it).
pub fn handshake_as(
    r: &mut impl Read,
    w: &mut impl Write,
    role: Role,
    caps: u32,
    ours: u16,
) -> Result<Agreed, ProtocolError> {
    let read_hello = |r: &mut _| -> Result<(u16, u32), ProtocolError> {
        match read_message(r, "before the handshake (is xenmig installed on the remote host?)")? {
            Message::Hello { version, role: theirs, caps: their_caps } => {
                if version < MIN_VERSION {
                    return Err(ProtocolError::Version { ours, min: MIN_VERSION, theirs: version });
                }
                if theirs == role {
                    return Err(ProtocolError::Malformed {
                        kind: Kind::Hello,
                        what: format!("both ends claim the {role:?} role"),
                    });
                }
                Ok((version, their_caps))
            }
            other => Err(ProtocolError::Unexpected { got: other.kind(), state: "waiting for Hello" }),
        }
    };
    let (version, their_caps) = match role {
        Role::Source => {
            // The oldest version we speak, and that we speak the next one:
            // a target that demands an exact match (version 1) accepts it.
            let (announce, next) = if ours > MIN_VERSION { (ours - 1, CAP_NEXT_VERSION) } else { (ours, 0) };
            write_message(w, &Message::Hello { version: announce, role, caps: caps | next })?;
            w.flush()?;
            let (theirs, their_caps) = read_hello(r)?;
            if theirs > ours || theirs < announce {
                // A target answers with the version it agreed on, which must
                // be one we offered.
                return Err(ProtocolError::Version { ours, min: MIN_VERSION, theirs });
            }
            (theirs, their_caps)
        }
        Role::Target => {
            let (theirs, their_caps) = read_hello(r)?;
            let theirs_max = if their_caps & CAP_NEXT_VERSION != 0 { theirs.saturating_add(1) } else { theirs };
            let agreed = theirs_max.min(ours);
            if agreed < theirs {
                return Err(ProtocolError::Version { ours, min: MIN_VERSION, theirs });
            }
            write_message(w, &Message::Hello { version: agreed, role, caps })?;
            w.flush()?;
            (agreed, their_caps)
        }
    };
    Ok(Agreed { version, caps: caps & their_caps & !CAP_NEXT_VERSION })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello { version: VERSION, role: Role::Target, caps: 5 },
            Message::ImageInfo {
                algo: Algorithm::Sha256,
                layout: Layout::from_segments(
                    40_000,
                    4096,
                    vec![Segment { start: 0, len: 32_256 }, Segment { start: 32_256, len: 7_744 }],
                )
                .unwrap(),
            },
            Message::Groups { first: 3, digests: vec![[1; 32], [2; 32]] },
            Message::GroupsEnd { image_digest: [9; 32] },
            Message::WantDigests { first_group: 7, count: 2 },
            Message::BlockDigests { group: 1, keys: vec![[3; KEY_LEN]; 4] },
            Message::Fetch { first_block: 99, count: 12 },
            Message::Blocks { first_block: 1, count: 2, codec: 1, raw_len: 8192, payload: vec![1, 2, 3] },
            Message::Done { report: "{}".into() },
            Message::Bye { downtime_ns: 12 },
            Message::PassBegin { pass: 2, final_pass: true, changed_blocks: 77 },
            Message::PassDone { pass: 1, stale_groups: vec![3, 9] },
            Message::KeepAlive,
            Message::Received { bytes: 1 << 40, waited_ns: 7 },
            Message::FetchDelta { block: 5, sig: vec![1, 2, 3, 4, 5, 6, 7, 8] },
            Message::FetchDeltaShort { block: 5, sig: vec![1, 2, 3, 4, 5, 6] },
            Message::Delta { block: 5, codec: 4, raw_len: 513, payload: vec![9; 20] },
            Message::WantChangedKeys { group: 3, subs: 16, zero: vec![0b101, 0], keys: vec![[4; KEY_LEN]; 14] },
            Message::ChangedKeys { group: 3, subs: 9, differ: vec![1, 1], keys: vec![[5; KEY_LEN]; 17] },
            Message::ChangedKeys { group: 0, subs: 0, differ: vec![], keys: vec![] },
            Message::RefOffer { refs: vec![([4; 32], 1 << 30), ([5; 32], 7)] },
            Message::RefOffer { refs: vec![] },
            Message::RefChosen { chosen: Some([6; 32]) },
            Message::RefChosen { chosen: None },
            Message::WantSketches { first_block: 40, count: 3 },
            Message::Sketches { first_block: 40, sketches: vec![[7; SKETCH_LEN], [8; SKETCH_LEN]] },
            Message::Sketches { first_block: 0, sketches: vec![] },
            Message::WantChangedSubs { group: 4, subs: 16, zero: vec![0b101, 0], keys: vec![[3; SHORT_KEY_LEN]; 14] },
            Message::ChangedSubs { group: 4, subs: 16, differ: vec![0b1001, 0] },
            Message::ChangedSubs { group: 0, subs: 0, differ: vec![] },
            Message::WantHintedKeys { group: 4, subs: 9, differ: vec![3, 1], zero: vec![2, 0], hints: vec![7; 34] },
            Message::HintedKeys { group: 4, count: 33, changed: vec![1, 0, 0, 0, 1], keys: vec![[6; KEY_LEN]; 2] },
            Message::HintedKeys { group: 1, count: 0, changed: vec![], keys: vec![] },
            Message::Holds { range: 640, k: 6, count: 10, bits: vec![0xa5; 9] },
            Message::Holds { range: 0, k: 0, count: 0, bits: vec![] },
            Message::HeldKeys {
                group: 3,
                subs: 9,
                differ: vec![1, 1],
                count: 17,
                keyed: vec![0b11, 0, 1],
                keys: vec![[5; KEY_LEN]; 3],
                run_keys: vec![[6; KEY_LEN]; 2],
            },
            Message::HeldKeys {
                group: 0,
                subs: 0,
                differ: vec![],
                count: 0,
                keyed: vec![],
                keys: vec![],
                run_keys: vec![],
            },
            Message::FetchDeltas { blocks: vec![3, 4, 300, 1 << 40, u64::MAX], sigs: vec![9; 80] },
            Message::FetchDeltas { blocks: vec![0], sigs: vec![] },
            Message::Deltas { codec: 3, raw_len: 7, blocks: vec![8, 9, 127, 128, 16_511], payload: vec![1, 2, 3] },
            Message::Deltas { codec: 0, raw_len: 0, blocks: vec![u64::MAX], payload: vec![] },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode();
            let back = read_frame(&mut &bytes[..], "test").unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn truncated_frames_are_eof_errors() {
        for m in samples() {
            let bytes = m.encode();
            for cut in [1, bytes.len() - 1] {
                if cut >= bytes.len() || cut == 0 {
                    continue;
                }
                let e = read_message(&mut &bytes[..cut], "test").unwrap_err();
                assert!(matches!(e, ProtocolError::Eof(_)), "{m:?} cut at {cut}: {e}");
            }
        }
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_before_reading_them() {
        let mut f = vec![Kind::Blocks as u8];
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_message(&mut &f[..], "t"), Err(ProtocolError::TooLarge { .. })));
        let f = [200u8, 0, 0, 0, 0];
        assert!(matches!(read_message(&mut &f[..], "t"), Err(ProtocolError::UnknownKind(200))));
    }

    /// Run a handshake between a source announcing `src` and a target
    /// announcing `tgt`; what each end agreed on.
    fn agree(src: u16, tgt: u16) -> (Result<Agreed, ProtocolError>, Result<Agreed, ProtocolError>) {
        let (mut a, mut b) = crate::wire::transport::Link::pair().unwrap();
        let t = std::thread::spawn(move || handshake_as(&mut b.reader, &mut b.writer, Role::Target, CAP_LIVE, tgt));
        let s = handshake_as(&mut a.reader, &mut a.writer, Role::Source, CAP_LIVE, src);
        (s, t.join().unwrap())
    }

    #[test]
    fn the_handshake_agrees_on_the_older_version_one_apart() {
        let v = |r: Result<Agreed, ProtocolError>| r.unwrap().version;
        let (s, t) = agree(2, 2);
        assert_eq!((v(s), v(t)), (2, 2));
        // A version-1 source: the target answers 1, which a v1 end accepts.
        let (s, t) = agree(1, 2);
        assert_eq!((v(s), v(t)), (1, 1));
        // A version-1 target (one that follows the rule) and a v2 source.
        let (s, t) = agree(2, 1);
        assert_eq!((v(s), v(t)), (1, 1));
        assert!(!agree(2, 1).0.unwrap().keepalive());
        assert!(agree(2, 2).0.unwrap().keepalive());
        // A newer target (3) speaks our 2.
        let (s, t) = agree(2, 3);
        assert_eq!((v(s), v(t)), (2, 2));
        // Version 0 is refused with both versions named.
        let (_, t) = agree(0, 2);
        let e = t.unwrap_err().to_string();
        assert!(e.contains("this end speaks 1..=2, the peer 0"), "{e}");
    }

    /// The previous release's target: writes its Hello at once, then
    /// demands exactly version 1 from the source.
    #[test]
    fn a_target_of_the_previous_release_accepts_a_current_source() {
        let (mut a, mut b) = crate::wire::transport::Link::pair().unwrap();
        let t = std::thread::spawn(move || {
            write_message(&mut b.writer, &Message::Hello { version: 1, role: Role::Target, caps: CAP_LIVE }).unwrap();
            b.writer.flush().unwrap();
            match read_message(&mut b.reader, "t").unwrap() {
                Message::Hello { version, caps, .. } => (version, caps),
                other => panic!("{other:?}"),
            }
        });
        let agreed = handshake(&mut a.reader, &mut a.writer, Role::Source, CAP_LIVE).unwrap();
        let (seen_version, seen_caps) = t.join().unwrap();
        assert_eq!(seen_version, 1, "an exact-match v1 target must see version 1");
        assert_eq!(seen_caps & CAP_LIVE, CAP_LIVE);
        assert_eq!(agreed.version, 1);
        assert_eq!(agreed.caps, CAP_LIVE, "the next-version bit is never an agreed capability");
        assert!(!agreed.keepalive());
    }

    #[test]
    fn hinted_frames_of_the_wrong_shape_are_malformed() {
        let frame = |kind: Kind, p: &[u8]| {
            let mut f = vec![kind as u8];
            f.extend_from_slice(&(p.len() as u32).to_le_bytes());
            f.extend_from_slice(p);
            read_message(&mut &f[..], "t").unwrap_err().to_string()
        };
        let mut p = 3u64.to_le_bytes().to_vec();
        p.extend_from_slice(&16u16.to_le_bytes());
        // ChangedSubs: 16 sub-groups need 2 bytes of bitmap, not 3 or 1.
        for bits in [&[0u8, 0, 0][..], &[0]] {
            let e = frame(Kind::ChangedSubs, &[&p[..], bits].concat());
            assert!(e.contains("malformed ChangedSubs frame"), "{e}");
        }
        // WantChangedSubs: a bitmap of 2 bytes, then whole short keys.
        let e = frame(Kind::WantChangedSubs, &[&p[..], &[0, 0], &[1; SHORT_KEY_LEN + 1]].concat());
        assert!(e.contains("malformed WantChangedSubs frame"), "{e}");
        // WantHintedKeys: two bitmaps of 2 bytes, then whole hints.
        let e = frame(Kind::WantHintedKeys, &[&p[..], &[0, 0, 0, 0, 9]].concat());
        assert!(e.contains("malformed WantHintedKeys frame"), "{e}");
        let e = frame(Kind::WantHintedKeys, &[&p[..], &[0, 0, 0]].concat());
        assert!(e.contains("malformed WantHintedKeys frame"), "{e}");
        // HintedKeys: a count whose bitmap the frame cannot hold, and keys
        // that are not whole.
        let mut h = 3u64.to_le_bytes().to_vec();
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = frame(Kind::HintedKeys, &h);
        assert!(e.contains("malformed HintedKeys frame"), "{e}");
        let mut h = 3u64.to_le_bytes().to_vec();
        h.extend_from_slice(&9u32.to_le_bytes());
        let e = frame(Kind::HintedKeys, &[&h[..], &[1, 0], &[5; KEY_LEN - 1]].concat());
        assert!(e.contains("malformed HintedKeys frame"), "{e}");
        // HeldKeys: cut inside its sub-group bitmap, a count whose bitmap
        // the frame cannot hold, keys that are not whole.
        let e = frame(Kind::HeldKeys, &[&p[..], &[0]].concat());
        assert!(e.contains("malformed HeldKeys frame"), "{e}");
        let e = frame(Kind::HeldKeys, &[&p[..], &[0, 0], &u32::MAX.to_le_bytes()].concat());
        assert!(e.contains("malformed HeldKeys frame"), "{e}");
        let e = frame(Kind::HeldKeys, &[&p[..], &[0, 0], &9u32.to_le_bytes(), &[1, 0], &[5; 3]].concat());
        assert!(e.contains("malformed HeldKeys frame"), "{e}");
        // Holds: shorter than its header.
        let e = frame(Kind::Holds, &[0; 12]);
        assert!(e.contains("malformed Holds frame"), "{e}");
    }

    #[test]
    fn batches_of_the_wrong_shape_are_malformed() {
        let frame = |kind: Kind, p: &[u8]| {
            let mut f = vec![kind as u8];
            f.extend_from_slice(&(p.len() as u32).to_le_bytes());
            f.extend_from_slice(p);
            read_message(&mut &f[..], "t").unwrap_err().to_string()
        };
        let cases: [(&[u8], &str); 7] = [
            (&[], "the count of blocks at byte 0 is cut short"),
            (&[0], "no blocks"),
            // A count the frame cannot hold, or past the bound, before
            // anything is allocated.
            (&[0xff, 0xff, 0xff, 0xff, 0x0f, 1], "more than the 65536 a batch may hold"),
            (&[0x80, 0x80, 0x04, 1], "claims 65536 blocks in 1 bytes"),
            // The same block twice: not ascending.
            (&[2, 5, 0], "block 5 twice"),
            // Past 2^64.
            (&[2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1], "lies past 2^64"),
            // A varint of eleven bytes.
            (&[1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00], "overlong"),
        ];
        for (p, want) in cases {
            let e = frame(Kind::FetchDeltas, p);
            assert!(e.contains("malformed FetchDeltas frame") && e.contains(want), "{p:?}: {e}");
        }
        // Signatures that are not whole short hashes.
        let e = frame(Kind::FetchDeltas, &[1, 4, 7, 7, 7]);
        assert!(e.contains("3 bytes of signatures is not n x 2"), "{e}");
        // Deltas: shorter than its header, more raw bytes than a run holds,
        // then its blocks as above.
        let e = frame(Kind::Deltas, &[0; 4]);
        assert!(e.contains("malformed Deltas frame"), "{e}");
        let big = (MAX_RUN_BYTES as u32 + 1).to_le_bytes();
        let e = frame(Kind::Deltas, &[&[0][..], &big, &[1, 4]].concat());
        assert!(e.contains("more than a run may hold"), "{e}");
        let e = frame(Kind::Deltas, &[0, 1, 0, 0, 0, 0]);
        assert!(e.contains("malformed Deltas frame: no blocks"), "{e}");
    }

    #[test]
    fn keepalives_are_skipped_by_read_message() {
        let mut f = Message::KeepAlive.encode();
        f.extend(Message::KeepAlive.encode());
        f.extend(Message::Fetch { first_block: 1, count: 2 }.encode());
        assert_eq!(read_message(&mut &f[..], "t").unwrap(), Message::Fetch { first_block: 1, count: 2 });
        assert_eq!(read_frame(&mut &f[..], "t").unwrap(), Message::KeepAlive);
    }

    #[test]
    fn remote_errors_surface_as_errors() {
        let f = Message::Error { message: "disk on fire".into() }.encode();
        let e = read_message(&mut &f[..], "t").unwrap_err();
        assert_eq!(e.to_string(), "the peer reported an error: disk on fire");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(kind in 0u8..29, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut f = vec![kind];
            f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            f.extend_from_slice(&payload);
            let _ = read_message(&mut &f[..], "t");
        }
    }
}
