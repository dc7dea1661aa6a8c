//! The image commands: `hash`, `index`, `similarity`, `show`.

use std::path::{Path, PathBuf};

use serde_json::json;

use xenmig::blocks::blockmap::BlockMap;
use xenmig::blocks::digest::hex;
use xenmig::copy::references::{layout_of, similarity, ReferenceSet};
use xenmig::formats::hashfile;
use xenmig::formats::index::Index;
use xenmig::storage::image::Image;

use super::HashArgs;

/// `xenmig hash`.
pub fn hash(image: PathBuf, output: Option<PathBuf>, hash: HashArgs, json: bool, quiet: bool) -> anyhow::Result<i32> {
    let img = Image::open_read(&image)?;
    let layout = layout_of(&img, hash.block_size, hash.align)?;
    if !hash.algo.collision_safe() {
        log::warn!("SHA-1 is not collision-safe: use it only for compatibility with older tools");
    }
    let progress = super::output::progress(quiet, false, "hash");
    progress.phase("hashing", layout.size);
    let map = BlockMap::compute(&img, layout, hash.algo, |_, _| {}, &|n| progress.inc(n))?;
    progress.finish();
    if let Some(out) = &output {
        // As private as the image it describes.
        let mode = std::fs::metadata(&image).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
        hashfile::write_mode(&map, out, mode.unwrap_or(0o600))?;
    }
    print_map_summary(&image, &map, json);
    Ok(0)
}

/// `xenmig index`.
pub fn index(output: PathBuf, images: Vec<PathBuf>, hash: HashArgs, quiet: bool) -> anyhow::Result<i32> {
    let progress = super::output::progress(quiet, false, "index");
    let mut idx = Index::new(hash.algo, hash.block_size);
    for path in &images {
        let img = Image::open_read(path)?;
        let layout = layout_of(&img, hash.block_size, hash.align)?;
        progress.phase("indexing", layout.size);
        let map = BlockMap::compute(&img, layout, hash.algo, |_, _| {}, &|n| progress.inc(n))?;
        let abs = std::fs::canonicalize(path)?;
        idx.add(abs, &map);
    }
    progress.finish();
    // One image: as private as it is; several: owner only.
    let mode = match images.as_slice() {
        [one] => std::fs::metadata(one)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap_or(0o600),
        _ => 0o600,
    };
    idx.write_mode(&output, mode)?;
    println!(
        "{}: {} images, {} distinct blocks, {} distinct groups",
        output.display(),
        idx.images.len(),
        idx.blocks.len(),
        idx.groups.len()
    );
    Ok(0)
}

/// `xenmig similarity`.
pub fn similarity_cmd(
    image: PathBuf,
    references: Vec<PathBuf>,
    hash: HashArgs,
    json: bool,
    quiet: bool,
) -> anyhow::Result<i32> {
    if references.is_empty() {
        anyhow::bail!("similarity: no references: give -r PATH, or `references` in the configuration");
    }
    let img = Image::open_read(&image)?;
    let layout = layout_of(&img, hash.block_size, hash.align)?;
    let progress = super::output::progress(quiet, false, "similarity");
    progress.phase("hashing", layout.size);
    let map = BlockMap::compute(&img, layout, hash.algo, |_, _| {}, &|n| progress.inc(n))?;
    let references = xenmig::copy::refglob::expand(&references, Some(&image))?;
    let refs = ReferenceSet::load(&references, hash.algo, hash.block_size, None)?;
    progress.finish();
    let sim = similarity(&map, &refs);
    let (total, zero, found) = (sim.blocks_total, sim.blocks_zero, sim.blocks_found);
    let v = json!({
        "image": image.display().to_string(),
        "references": references.iter().map(|r| r.display().to_string()).collect::<Vec<_>>(),
        "blocks_total": total,
        "blocks_zero": zero,
        "blocks_found": found,
        "blocks_missing": sim.blocks_missing(),
        "found_percent_of_nonzero": sim.found_percent_of_nonzero(),
        "found_or_zero_percent": sim.found_or_zero_percent(),
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "{}: {total} blocks, {zero} zero ({:.1}%), {found} of the {} non-zero found in the references ({:.1}%), {} missing",
            image.display(),
            sim.zero_percent(),
            total - zero,
            sim.found_percent_of_nonzero(),
            sim.blocks_missing()
        );
    }
    Ok(0)
}

/// `xenmig show`.
pub fn show(file: PathBuf) -> anyhow::Result<i32> {
    if xenmig::copy::references::is_index_file(&file) {
        let idx = Index::read(&file)?;
        println!(
            "index {}: {} {} bytes/block, {} distinct blocks",
            file.display(),
            idx.algo,
            idx.block_size,
            idx.blocks.len()
        );
        for im in &idx.images {
            println!(
                "  {}  {} bytes  {}",
                hex(&im.image_digest[..idx.algo.width()]),
                im.layout.size,
                im.path.display()
            );
        }
    } else {
        let map = hashfile::read(&file)?;
        print_map_summary(&file, &map, false);
    }
    Ok(0)
}

fn print_map_summary(path: &Path, map: &BlockMap, json: bool) {
    let w = map.algo.width();
    if json {
        let v = json!({
            "image": path.display().to_string(),
            "algorithm": map.algo.name(),
            "block_size": map.layout.block_size,
            "image_size": map.layout.size,
            "segments": map.layout.segments,
            "blocks_total": map.digests.len(),
            "blocks_zero": map.zero_blocks(),
            "digest": hex(&map.image_digest[..w]),
        });
        println!("{v}");
    } else {
        println!(
            "{}  {}  {} {}-byte blocks ({} zero), {} segment(s), {}",
            hex(&map.image_digest[..w]),
            path.display(),
            map.digests.len(),
            map.layout.block_size,
            map.zero_blocks(),
            map.layout.segments.len(),
            map.algo
        );
    }
}
