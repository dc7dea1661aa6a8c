//! The source end: hash the image, stream group digests, answer requests.
//!
//! Threads: the caller hashes (on all cores through rayon) and streams
//! group digests; a reader thread takes requests off the link; a few worker
//! threads read, compress and frame the requested blocks; one writer thread
//! owns the link's write half. Replies carry their block numbers, so
//! workers may finish in any order.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::blockmap::{byte_range, BlockMap};
use crate::compress::{AutoPolicy, Choice, Codec};
use crate::digest::{key_of, Algorithm, Digest};
use crate::image::Image;
use crate::layout::{Align, Layout};
use crate::protocol::{self, read_message, write_message, Message, Role, MAX_RUN_BYTES};
use crate::transport::{Link, LinkStats, Reader, Writer};

use super::references::layout_of;
use super::{EngineError, Progress, Report};

#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub algo: Algorithm,
    pub block_size: u32,
    pub align: Align,
    pub compress: Choice,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            algo: Algorithm::Blake3,
            block_size: 4096,
            align: Align::Partitions,
            compress: Choice::Auto,
        }
    }
}

/// State shared by the source's threads.
struct Shared {
    img: Image,
    layout: Layout,
    /// Block digests hashed so far (a prefix of the image, whole groups).
    digests: RwLock<Vec<Digest>>,
    compress: Choice,
    auto: Mutex<AutoPolicy>,
    stats: Arc<LinkStats>,
    workers: usize,
}

/// Serve `path` as the source of a copy over `link`. Returns the target's
/// report once the target has verified its copy and said Done.
pub fn run(
    path: &Path,
    opts: &SourceOptions,
    mut link: Link,
    progress: &Progress,
) -> Result<Report, EngineError> {
    let img = Image::open_read(path)?;
    let layout = layout_of(&img, opts.block_size, opts.align)?;
    protocol::handshake(&mut link.reader, &mut link.writer, Role::Source, 0)?;
    write_message(
        &mut link.writer,
        &Message::ImageInfo {
            algo: opts.algo,
            layout: layout.clone(),
        },
    )?;
    link.writer.flush().map_err(protocol::ProtocolError::Io)?;

    let workers = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    let shared = Arc::new(Shared {
        img,
        layout: layout.clone(),
        digests: RwLock::new(Vec::with_capacity(layout.block_count() as usize)),
        compress: opts.compress,
        auto: Mutex::new(AutoPolicy::default()),
        stats: link.stats.clone(),
        workers,
    });

    let Link { reader, writer, .. } = link;
    let (frames_tx, frames_rx) = bounded::<Message>(2 * workers + 2);
    let (work_tx, work_rx) = unbounded::<Message>();
    // Failures of any thread, and the reader's final answer: the caller
    // waits on whichever comes first, so a dead link never leaves it
    // waiting for a Done that cannot come.
    let (fail_tx, fail_rx) = unbounded::<EngineError>();
    let (done_tx, done_rx) = bounded::<Result<Report, EngineError>>(1);
    let (writer_done_tx, writer_done_rx) = bounded::<()>(1);

    let fail = fail_tx.clone();
    let writer_thread = thread::spawn(move || {
        if let Err(e) = write_loop(writer, frames_rx) {
            let _ = fail.send(e);
        }
        let _ = writer_done_tx.send(());
    });
    let reader_frames = frames_tx.clone();
    thread::spawn(move || {
        let _ = done_tx.send(read_loop(reader, work_tx, reader_frames));
    });
    let mut worker_threads = Vec::new();
    for _ in 0..workers {
        let (rx, tx, sh, fail) = (
            work_rx.clone(),
            frames_tx.clone(),
            shared.clone(),
            fail_tx.clone(),
        );
        worker_threads.push(thread::spawn(move || {
            if let Err(e) = work_loop(&sh, rx, tx) {
                let _ = fail.send(e);
            }
        }));
    }
    drop((work_rx, fail_tx));

    // Let the writer flush what it has (an Error frame, say) before we
    // return and the process may exit.
    let give_up = |e: EngineError, frames_tx: crossbeam_channel::Sender<Message>| {
        drop(frames_tx);
        let _ = writer_done_rx.recv_timeout(std::time::Duration::from_secs(2));
        Err(e)
    };

    progress.phase("hashing", layout.size);
    let hashed = BlockMap::compute_streaming(
        &shared.img,
        layout.clone(),
        opts.algo,
        |first, batch| {
            {
                let mut d = shared.digests.write().unwrap();
                for g in batch {
                    d.extend_from_slice(&g.blocks);
                }
            }
            let digests = batch.iter().map(|g| g.digest).collect();
            // Stop hashing as soon as the link or a worker has failed.
            frames_tx.send(Message::Groups { first, digests }).is_ok()
                && fail_rx.is_empty()
                && done_rx.is_empty()
        },
        &|n| progress.inc(n),
    );
    match hashed {
        Ok(Some(map)) => {
            let _ = frames_tx.send(Message::GroupsEnd {
                image_digest: map.image_digest,
            });
        }
        Ok(None) => {
            // Stopped early: the cause is the failure or the reader's answer.
            let e = match fail_rx.try_recv() {
                Ok(e) => e,
                Err(_) => match done_rx.recv() {
                    Ok(Err(e)) => e,
                    _ => EngineError::Other(
                        "the target finished before the source was hashed".into(),
                    ),
                },
            };
            return give_up(e, frames_tx);
        }
        Err(e) => {
            let _ = frames_tx.send(Message::Error {
                message: format!("source: {e}"),
            });
            return give_up(e.into(), frames_tx);
        }
    }
    progress.phase("sending", layout.size);

    let answer = crossbeam_channel::select! {
        recv(done_rx) -> r => r.unwrap_or_else(|_| Err(EngineError::Other("the source's reader stopped without an answer".into()))),
        recv(fail_rx) -> e => Err(e.unwrap_or_else(|_| EngineError::Other("a source thread failed".into()))),
    };
    let report = match answer {
        Ok(r) => r,
        Err(e) => return give_up(e, frames_tx),
    };
    drop(frames_tx);
    for w in worker_threads {
        w.join().expect("worker thread panicked");
    }
    writer_thread.join().expect("writer thread panicked");
    // A failure to deliver Bye is still a failure of this end.
    if let Ok(e) = fail_rx.try_recv() {
        return Err(e);
    }
    Ok(report)
}

/// Own the write half: send frames, flushing whenever the queue runs dry.
fn write_loop(mut w: Writer, rx: Receiver<Message>) -> Result<(), EngineError> {
    loop {
        let m = match rx.try_recv() {
            Ok(m) => m,
            Err(_) => {
                w.flush().map_err(protocol::ProtocolError::Io)?;
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                }
            }
        };
        write_message(&mut w, &m)?;
    }
}

/// Take requests off the link until Done; answer Done with Bye.
fn read_loop(
    mut r: Reader,
    work: Sender<Message>,
    frames: Sender<Message>,
) -> Result<Report, EngineError> {
    let result = (|| loop {
        match read_message(&mut r, "before the target said Done")? {
            m @ (Message::WantDigests { .. } | Message::Fetch { .. }) => {
                let _ = work.send(m);
            }
            Message::Done { report } => {
                let report: Report = serde_json::from_str(&report)
                    .map_err(|e| EngineError::BadReply(format!("an unreadable report: {e}")))?;
                let _ = frames.send(Message::Bye);
                return Ok(report);
            }
            other => {
                return Err(EngineError::Protocol(protocol::ProtocolError::Unexpected {
                    got: other.kind(),
                    state: "serving requests",
                }))
            }
        }
    })();
    if let Err(e) = &result {
        let _ = frames.send(Message::Error {
            message: format!("source: {e}"),
        });
    }
    result
}

fn work_loop(sh: &Shared, rx: Receiver<Message>, tx: Sender<Message>) -> Result<(), EngineError> {
    for m in rx {
        let reply = match m {
            Message::WantDigests { first_group, count } => {
                want_digests(sh, first_group, count, &tx)
            }
            Message::Fetch { first_block, count } => fetch(sh, first_block, count).map(|m| {
                let _ = tx.send(m);
            }),
            _ => unreachable!("reader forwards only requests"),
        };
        if let Err(e) = reply {
            let _ = tx.send(Message::Error {
                message: format!("source: {e}"),
            });
            return Err(e);
        }
    }
    Ok(())
}

fn want_digests(
    sh: &Shared,
    first: u64,
    count: u32,
    tx: &Sender<Message>,
) -> Result<(), EngineError> {
    let end = first
        .checked_add(count as u64)
        .filter(|&e| e <= sh.layout.group_count() && count > 0);
    let Some(end) = end else {
        return Err(EngineError::BadRequest(format!(
            "digests of groups {first}+{count}, image has {}",
            sh.layout.group_count()
        )));
    };
    for g in first..end {
        let (a, b) = sh.layout.group_range(g);
        let keys = {
            let d = sh.digests.read().unwrap();
            if (d.len() as u64) < b {
                return Err(EngineError::BadRequest(format!(
                    "digests of group {g} before it was announced"
                )));
            }
            d[a as usize..b as usize].iter().map(key_of).collect()
        };
        let _ = tx.send(Message::BlockDigests { group: g, keys });
    }
    Ok(())
}

fn fetch(sh: &Shared, first: u64, count: u32) -> Result<Message, EngineError> {
    let end = first
        .checked_add(count as u64)
        .filter(|&e| e <= sh.layout.block_count() && count > 0);
    let Some(end) = end else {
        return Err(EngineError::BadRequest(format!(
            "blocks {first}+{count}, image has {}",
            sh.layout.block_count()
        )));
    };
    let (start, stop) = byte_range(&sh.layout, first, end);
    if stop - start > MAX_RUN_BYTES {
        return Err(EngineError::BadRequest(format!(
            "a run of {} bytes, more than {MAX_RUN_BYTES}",
            stop - start
        )));
    }
    let mut raw = vec![0u8; (stop - start) as usize];
    sh.img.read_at(&mut raw, start)?;
    let raw_len = raw.len() as u32;
    let codec = match sh.compress {
        Choice::Fixed(c) => c,
        Choice::Auto => {
            let mut p = sh.auto.lock().unwrap();
            if p.wants_sample() {
                p.sample(&raw);
            }
            p.choose(sh.stats.drain_rate(), sh.workers, raw.len() as u64)
        }
    };
    let (mut payload, mut code) = (raw, Codec::None.code());
    if codec != Codec::None {
        let packed = codec.compress(&payload);
        // Incompressible data goes raw: cheaper to decode, never larger.
        if packed.len() < payload.len() {
            (payload, code) = (packed, codec.code());
        }
    }
    Ok(Message::Blocks {
        first_block: first,
        count,
        codec: code,
        raw_len,
        payload,
    })
}
