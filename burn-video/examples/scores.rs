//! Prints the scores of every clip under a folder: `cargo run -p burn-video --example scores DIR`.
use burn_video::clip::{Clip, list_clips};
use burn_video::filter::scores;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: scores DIR")?;
    for path in list_clips(std::path::Path::new(&dir))? {
        let clip = Clip::read(&path)?;
        let s = scores(&clip);
        println!(
            "{}: sharpness {:.1} motion {:.2} max_cut {:.3} at {}",
            path.display(),
            s.sharpness,
            s.motion,
            s.max_cut,
            s.cut_at
        );
    }
    Ok(())
}
