//! The clip pipeline on clips built to trigger each filter (a hard cut, a blurred clip, a
//! static clip) from the public clips, GIF and PNG round trips, buckets, the manifest and the
//! synthetic generator.

use std::path::{Path, PathBuf};

use burn_video::clip::{Clip, list_clips};
use burn_video::filter::{Filters, Rejection, scores};
use burn_video::metrics::{Frame, psnr};
use burn_video::pipeline::{Bucket, Buckets, read_manifest, scan, write_manifest};
use burn_video::synthetic::{Colour, Direction, Label, Shape, generate};

/// The public clips (`VIDEO_CLIPS_DIR` overrides `../shared/data/video-clips`).
fn clips_dir() -> PathBuf {
    let dir = std::env::var_os("VIDEO_CLIPS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/video-clips"),
        PathBuf::from,
    );
    assert!(
        dir.is_dir(),
        "no clips at {}; set VIDEO_CLIPS_DIR",
        dir.display()
    );
    dir
}

fn clip(i: usize) -> Clip {
    Clip::read(&clips_dir().join(format!("clip_{i:04}"))).expect("public clip")
}

/// Box blur of radius `r` (clamped at the borders), applied `times` times.
fn blur(frame: &Frame, r: usize, times: usize) -> Frame {
    let (w, h, c) = frame.size();
    let mut px = frame.pixels().to_vec();
    for _ in 0..times {
        let src = px.clone();
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let (mut sum, mut n) = (0.0, 0.0);
                    for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                        for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                            sum += src[(yy * w + xx) * c + ch];
                            n += 1.0;
                        }
                    }
                    px[(y * w + x) * c + ch] = sum / n;
                }
            }
        }
    }
    Frame::new(w, h, c, px).expect("frame")
}

fn reasons(entry: &burn_video::pipeline::Entry) -> Vec<&'static str> {
    entry
        .rejections
        .iter()
        .map(|r| match r {
            Rejection::SceneCut { .. } => "cut",
            Rejection::Blurry { .. } => "blurry",
            Rejection::Static { .. } => "static",
            Rejection::TooFast { .. } => "fast",
            Rejection::TooShort { .. } => "short",
            Rejection::Unreadable { .. } => "unreadable",
            Rejection::NoBucket { .. } => "bucket",
        })
        .collect()
}

#[test]
fn crafted_clips_are_rejected_for_the_right_reason_and_the_manifest_says_why() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let root = tmp.path().join("clips");
    // A good clip, unchanged.
    let good = clip(0);
    good.write_dir(&root.join("a_good")).expect("write");
    // A hard cut: the first half of one clip, then the second half of a clip of another photo.
    let other = clip(3);
    let mut frames = good.frames()[..8].to_vec();
    frames.extend_from_slice(&other.frames()[8..]);
    Clip::new(frames)
        .expect("clip")
        .write_dir(&root.join("b_cut"))
        .expect("write");
    // Blurred: every frame box-blurred.
    let blurred: Vec<Frame> = good.frames().iter().map(|f| blur(f, 2, 3)).collect();
    Clip::new(blurred)
        .expect("clip")
        .write_dir(&root.join("c_blurred"))
        .expect("write");
    // Static: the first frame 17 times.
    Clip::new(vec![good.frames()[0].clone(); 17])
        .expect("clip")
        .write_dir(&root.join("d_static"))
        .expect("write");
    // Unreadable: a folder with a broken PNG.
    std::fs::create_dir_all(root.join("e_broken")).expect("mkdir");
    std::fs::write(root.join("e_broken/frame_000.png"), b"not a png").expect("write");

    let entries = scan(&root, &Filters::default(), &Buckets::default()).expect("scan");
    for e in &entries {
        println!("{}: {:?} {:?}", e.clip.display(), e.scores, e.reasons);
    }
    let got: Vec<Vec<&str>> = entries.iter().map(reasons).collect();
    assert_eq!(
        got,
        vec![
            vec![],
            vec!["cut"],
            vec!["blurry"],
            vec!["static"],
            vec!["unreadable"]
        ]
    );
    assert!(entries[0].accepted);
    assert_eq!(
        entries[0].bucket,
        Some(Bucket {
            width: 64,
            height: 64,
            frames: 17
        })
    );
    // The cut is found where it is.
    assert!(matches!(
        entries[1].rejections[0],
        Rejection::SceneCut { frame: 8, .. }
    ));
    assert!(
        entries[1..]
            .iter()
            .all(|e| !e.accepted && !e.reasons.is_empty())
    );

    let manifest = tmp.path().join("manifest.jsonl");
    write_manifest(&manifest, &entries).expect("manifest");
    assert_eq!(read_manifest(&manifest).expect("read"), entries);
    let text = std::fs::read_to_string(&manifest).expect("text");
    assert_eq!(text.lines().count(), 5);
    assert!(text.contains("scene cut at frame 8"), "{text}");
}

#[test]
fn the_public_clips_pass_the_default_filters_except_the_featureless_gradients() {
    let entries = scan(&clips_dir(), &Filters::default(), &Buckets::default()).expect("scan");
    assert!(entries.len() >= 40, "{} clips", entries.len());
    for e in &entries {
        let s = e.scores.as_ref().expect("scores");
        // The only rejections are for a lack of detail (the smooth colour-wheel photo).
        assert!(
            e.accepted || reasons(e) == ["blurry"],
            "{}: {:?}",
            e.clip.display(),
            e.reasons
        );
        assert!(
            s.max_cut < Filters::default().max_cut / 2.0,
            "{}: {s:?}",
            e.clip.display()
        );
    }
    let accepted = entries.iter().filter(|e| e.accepted).count();
    assert!(
        accepted * 10 >= entries.len() * 8,
        "{accepted} of {}",
        entries.len()
    );
}

#[test]
fn buckets_cut_clips_to_the_longest_allowed_length_and_filter_resolutions() {
    let b = Buckets::default();
    let bucket = |w, h, f| b.assign(w, h, f).map(|b| b.frames);
    assert_eq!(bucket(64, 64, 17), Some(17));
    assert_eq!(bucket(64, 64, 16), Some(9));
    assert_eq!(bucket(64, 64, 5), Some(5));
    assert_eq!(bucket(64, 64, 3), Some(1));
    let only = Buckets {
        lengths: vec![9],
        resolutions: vec![(32, 32)],
    };
    assert_eq!(only.assign(64, 64, 17), None);
    assert_eq!(only.assign(32, 32, 8), None);
    assert_eq!(only.assign(32, 32, 17).map(|b| b.frames), Some(9));
    let bad = Buckets {
        lengths: vec![],
        resolutions: vec![],
    };
    assert!(bad.validate().unwrap_err().to_string().contains("lengths"));
}

#[test]
fn gif_and_png_round_trips_keep_the_frames() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let c = clip(5);
    let gif = tmp.path().join("clip.gif");
    c.write_gif(&gif, 80).expect("gif");
    let back = Clip::read(&gif).expect("read gif");
    assert_eq!(back.len(), c.len());
    assert_eq!(back.size(), c.size());
    // GIF quantises to 256 colours per frame.
    for (a, b) in c.frames().iter().zip(back.frames()) {
        let p = psnr(a, b, 1.0).expect("psnr");
        assert!(p > 25.0, "gif frame PSNR {p}");
    }
    c.write_dir(&tmp.path().join("png")).expect("png");
    assert_eq!(Clip::read(&tmp.path().join("png")).expect("read png"), c);
    let wide = c.side_by_side(&back).expect("side by side");
    assert_eq!(wide.size(), (128, 64));
    let listed = list_clips(tmp.path()).expect("list");
    assert_eq!(listed.len(), 2);
    let err = Clip::read(&tmp.path().join("missing.mp4"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.mp4"), "{err}");
}

#[test]
fn synthetic_clips_show_their_label() {
    let label = Label {
        shape: Shape::Circle,
        colour: Colour::Red,
        direction: Direction::Left,
        count: 2,
    };
    assert_eq!(label.caption(), "2 red circles moving left");
    let a = generate(&label, 64, 17, 7).expect("clip");
    assert_eq!(
        a,
        generate(&label, 64, 17, 7).expect("clip"),
        "deterministic"
    );
    assert_ne!(a, generate(&label, 64, 17, 8).expect("clip"));
    // The red pixels' centroid moves left by 2 pixels a frame.
    let centroid = |f: &Frame| {
        let (w, _, _) = f.size();
        let (mut sx, mut n) = (0.0, 0.0);
        for (i, p) in f.pixels().chunks_exact(3).enumerate() {
            if p[0] > 0.5 && p[1] < 0.5 {
                sx += (i % w) as f64;
                n += 1.0;
            }
        }
        sx / n
    };
    let (x0, x16) = (centroid(&a.frames()[0]), centroid(&a.frames()[16]));
    assert!((x0 - x16 - 32.0).abs() < 1.5, "{x0} → {x16}");
    let s = scores(&a);
    assert!(s.motion > 0.5 && s.max_cut < 0.3, "{s:?}");
    assert!(Label::nth(0) != Label::nth(1));
    assert!(
        generate(&label, 8, 17, 0)
            .unwrap_err()
            .to_string()
            .contains("size")
    );
}

#[test]
fn the_squeeze_baseline_scores_about_20_db_on_the_public_clips() {
    use burn_video::resample::{quality, resize, squeeze};
    // Resizing to the same size is the identity; a constant clip stays constant.
    let c = clip(1);
    let same = resize(&c, 17, 64, 64).expect("resize");
    let (p, _) = quality(&[(c.clone(), same)]).expect("quality");
    assert!(p > 90.0, "identity resize PSNR {p}");
    // The baseline of a 5×8×8×16 latent: 5 frames of 18×18 RGB, resized back.
    let pairs: Vec<(Clip, Clip)> = list_clips(&clips_dir())
        .expect("list")
        .iter()
        .map(|p| {
            let c = Clip::read(p).expect("clip");
            let s = squeeze(&c, 5, 18, 18).expect("squeeze");
            (c, s)
        })
        .collect();
    let (psnr_db, ssim_v) = quality(&pairs).expect("quality");
    println!(
        "baseline on {} public clips: PSNR {psnr_db:.2} dB, SSIM {ssim_v:.4}",
        pairs.len()
    );
    // The independent reference: about 20.3 dB.
    assert!((psnr_db - 20.3).abs() < 0.5, "{psnr_db}");
}

#[test]
fn the_checker_reads_every_synthetic_label_back() {
    use burn_video::checker::{check, observe};
    use burn_video::synthetic::{Label, generate};
    let (mut colour, mut direction, mut count, mut total) = (0, 0, 0, 0);
    for i in 0..144 {
        let label = Label::nth(i);
        let clip = generate(&label, 64, 17, i as u64).expect("clip");
        let v = check(&clip, &label);
        colour += usize::from(v.colour);
        direction += usize::from(v.direction);
        count += usize::from(v.count);
        total += 1;
        // Another direction is never accepted.
        let mut wrong = label;
        wrong.direction = Label::nth(i + 12).direction;
        assert!(!check(&clip, &wrong).direction, "{label:?}");
    }
    assert_eq!((colour, direction, count), (total, total, total));
    // Captions parse back to their labels; other text does not.
    for i in 0..144 {
        let label = Label::nth(i);
        assert_eq!(Label::parse(&label.caption()), Some(label));
    }
    assert_eq!(Label::parse("4 red squares moving left"), None);
    // An empty (background-only) clip shows nothing.
    let empty = burn_video::clip::Clip::new(vec![
        burn_video::metrics::Frame::new(
            16,
            16,
            3,
            vec![0.1; 16 * 16 * 3]
        )
        .expect("frame");
        5
    ])
    .expect("clip");
    let o = observe(&empty);
    assert_eq!((o.colour, o.direction, o.count), (None, None, 0));
}
