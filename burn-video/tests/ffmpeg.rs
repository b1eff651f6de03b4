//! MP4 and other containers through FFmpeg (feature `ffmpeg`): a clip written and read back
//! keeps its length and size and stays close to the original (lossy MPEG-4 at a fine
//! quantiser); folders list video files; a broken file is a decode error naming it.
#![cfg(feature = "ffmpeg")]

use burn_video::clip::{Clip, list_clips};
use burn_video::resample::quality;
use burn_video::synthetic::{Label, generate};

#[test]
fn a_clip_survives_mp4_and_mkv() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let clip = generate(&Label::nth(3), 64, 17, 5).expect("synthetic clip");
    for ext in ["mp4", "mkv"] {
        let path = tmp.path().join(format!("clip.{ext}"));
        clip.write_video(&path, 8).expect("write");
        let back = Clip::read(&path).expect("read");
        assert_eq!((back.len(), back.size()), (17, (64, 64)), "{ext}");
        let (psnr, ssim) = quality(&[(clip.clone(), back)]).expect("quality");
        assert!(psnr > 30.0 && ssim > 0.9, "{ext}: {psnr} dB, SSIM {ssim}");
    }
    let listed = list_clips(tmp.path()).expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
}

#[test]
fn a_broken_video_is_a_decode_error_naming_the_file() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let path = tmp.path().join("broken.mp4");
    std::fs::write(&path, b"not a video at all").expect("write");
    let e = Clip::read(&path).unwrap_err().to_string();
    assert!(e.contains("broken.mp4"), "{e}");
    let odd = generate(&Label::nth(0), 64, 5, 1)
        .expect("clip")
        .frames()
        .iter()
        .map(|f| {
            let (w, _, _) = f.size();
            let px = f.pixels()[..(w - 1) * 3 * 63].to_vec();
            burn_video::metrics::Frame::new(w - 1, 63, 3, px).expect("frame")
        })
        .collect::<Vec<_>>();
    let odd = Clip::new(odd).expect("clip");
    let e = odd
        .write_video(&tmp.path().join("odd.mp4"), 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("even"), "{e}");
    assert!(!tmp.path().join("odd.mp4").exists());
}
