//! MP4 and anything else FFmpeg reads (feature `ffmpeg`: Debian's libav*-dev through the
//! `ffmpeg-next` binding; `scripts/setup-ffmpeg` installs them): [`read_frames`] decodes the
//! first video stream to RGB frames, [`write_frames`] encodes frames (MPEG-4 Part 2, FFmpeg's
//! built-in encoder, so no external codec library is needed) into any container FFmpeg
//! writes, chosen by the file extension (`.mp4`, `.mkv`, `.avi`, …). Clips use them through
//! `Clip::read` and `Clip::write_video`.

use std::path::Path;
use std::sync::Once;

use ffmpeg_next as ff;

use crate::error::{Result, VideoError, io};
use crate::metrics::Frame;

fn decode(path: &Path, e: impl std::fmt::Display) -> VideoError {
    VideoError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Registration cannot fail on FFmpeg ≥ 4. FFmpeg's own log stays quiet: its errors
        // come back as this module's errors.
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Quiet);
    });
}

/// Copies a packed RGB24 frame (rows may be padded) into a [`Frame`] with values in `[0, 1]`.
fn to_frame(rgb: &ff::frame::Video) -> Result<Frame> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let stride = rgb.stride(0);
    let data = rgb.data(0);
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        px.extend(
            data[y * stride..y * stride + 3 * w]
                .iter()
                .map(|&v| f32::from(v) / 255.0),
        );
    }
    Ok(Frame::new(w, h, 3, px)?)
}

/// Decodes every frame of the first video stream of `path` to RGB (`Clip::read` reads video
/// files through it).
pub fn read_frames(path: &Path) -> Result<Vec<Frame>> {
    init();
    let mut input = ff::format::input(path).map_err(|e| decode(path, e))?;
    let stream = input
        .streams()
        .best(ff::media::Type::Video)
        .ok_or_else(|| decode(path, "no video stream"))?;
    let index = stream.index();
    let context = ff::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| decode(path, e))?;
    let mut decoder = context.decoder().video().map_err(|e| decode(path, e))?;
    let (w, h) = (decoder.width(), decoder.height());
    if w == 0 || h == 0 {
        return Err(decode(path, "video stream of size 0"));
    }
    let mut scaler = ff::software::scaling::Context::get(
        decoder.format(),
        w,
        h,
        ff::format::Pixel::RGB24,
        w,
        h,
        ff::software::scaling::Flags::BILINEAR,
    )
    .map_err(|e| decode(path, e))?;
    let mut frames = Vec::new();
    let mut receive = |decoder: &mut ff::decoder::Video, frames: &mut Vec<Frame>| -> Result<()> {
        let mut decoded = ff::frame::Video::empty();
        while decoder.receive_frame(&mut decoded).is_ok() {
            let mut rgb = ff::frame::Video::empty();
            scaler
                .run(&decoded, &mut rgb)
                .map_err(|e| decode(path, e))?;
            frames.push(to_frame(&rgb)?);
        }
        Ok(())
    };
    for (stream, packet) in input.packets() {
        if stream.index() == index {
            decoder.send_packet(&packet).map_err(|e| decode(path, e))?;
            receive(&mut decoder, &mut frames)?;
        }
    }
    decoder.send_eof().map_err(|e| decode(path, e))?;
    receive(&mut decoder, &mut frames)?;
    if frames.is_empty() {
        return Err(decode(path, "no decodable video frames"));
    }
    Ok(frames)
}

/// Encodes `clip` at `fps` frames per second into `path` (container from the extension), at a
/// high quality (quantiser 2), through a temporary file renamed into place.
/// `frames` must share one size (as a clip's do; `Clip::write_video` writes through it).
pub fn write_frames(frames: &[Frame], path: &Path, fps: u32) -> Result<()> {
    init();
    if fps == 0 {
        return Err(crate::error::invalid("fps", "must be at least 1"));
    }
    let Some((w, h, _)) = frames.first().map(Frame::size) else {
        return Err(crate::error::invalid("frames", "no frames to write"));
    };
    if w % 2 != 0 || h % 2 != 0 {
        return Err(crate::error::invalid(
            "clip",
            format!("{w}x{h}: MPEG-4 needs even width and height"),
        ));
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_extension(format!("tmp.{ext}"));
    let result = encode(frames, &tmp, fps, (w as u32, h as u32));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn encode(frames: &[Frame], path: &Path, fps: u32, (w, h): (u32, u32)) -> Result<()> {
    let err = |e: ff::Error| io(path, e);
    let mut output = ff::format::output(path).map_err(err)?;
    let global_header = output
        .format()
        .flags()
        .contains(ff::format::Flags::GLOBAL_HEADER);
    let codec = ff::encoder::find(ff::codec::Id::MPEG4)
        .ok_or_else(|| io(path, "FFmpeg has no MPEG-4 encoder"))?;
    let mut stream = output.add_stream(codec).map_err(err)?;
    let index = stream.index();
    let time_base = ff::Rational::new(1, fps as i32);
    let mut encoder = ff::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(err)?;
    encoder.set_width(w);
    encoder.set_height(h);
    encoder.set_format(ff::format::Pixel::YUV420P);
    encoder.set_time_base(time_base);
    encoder.set_frame_rate(Some(ff::Rational::new(fps as i32, 1)));
    encoder.set_gop(12);
    encoder.set_qmax(2);
    encoder.set_qmin(1);
    if global_header {
        encoder.set_flags(ff::codec::Flags::GLOBAL_HEADER);
    }
    let mut encoder = encoder.open_as(codec).map_err(err)?;
    stream.set_parameters(&encoder);
    stream.set_time_base(time_base);
    output.write_header().map_err(err)?;
    let stream_time_base = output
        .stream(index)
        .map(|s| s.time_base())
        .unwrap_or(time_base);
    let mut scaler = ff::software::scaling::Context::get(
        ff::format::Pixel::RGB24,
        w,
        h,
        ff::format::Pixel::YUV420P,
        w,
        h,
        ff::software::scaling::Flags::BILINEAR,
    )
    .map_err(err)?;
    let drain = |encoder: &mut ff::encoder::Video,
                 output: &mut ff::format::context::Output|
     -> Result<()> {
        let mut packet = ff::Packet::empty();
        while encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(index);
            // One frame long: without a duration MP4's last sample is cut by its edit list.
            packet.set_duration(1);
            packet.rescale_ts(time_base, stream_time_base);
            packet.write_interleaved(output).map_err(err)?;
        }
        Ok(())
    };
    for (i, frame) in frames.iter().enumerate() {
        let mut rgb = ff::frame::Video::new(ff::format::Pixel::RGB24, w, h);
        let stride = rgb.stride(0);
        let row = 3 * w as usize;
        let data = rgb.data_mut(0);
        for (y, src) in frame.pixels().chunks_exact(row).enumerate() {
            for (d, s) in data[y * stride..y * stride + row].iter_mut().zip(src) {
                *d = (s.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        let mut yuv = ff::frame::Video::empty();
        scaler.run(&rgb, &mut yuv).map_err(err)?;
        yuv.set_pts(Some(i as i64));
        encoder.send_frame(&yuv).map_err(err)?;
        drain(&mut encoder, &mut output)?;
    }
    encoder.send_eof().map_err(err)?;
    drain(&mut encoder, &mut output)?;
    output.write_trailer().map_err(err)
}
