//! A minimal PNG writer for palette images: enough for the timeline, with
//! no image crate in the dependency tree. Pixels are palette indices; the
//! zlib stream uses fixed-Huffman deflate blocks with back-references to
//! the previous pixel and to the row above (a plot is mostly flat areas
//! and repeated rows, which those two distances compress to a few percent).
//! Format: PNG (ISO/IEC 15948), zlib (RFC 1950), deflate (RFC 1951).

/// Length codes 257..=285: base length and extra bits (RFC 1951 3.2.5).
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Distance codes 0..=29: base distance and extra bits.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// Deflate's longest match and farthest distance.
const MAX_MATCH: usize = 258;
const MAX_DISTANCE: usize = 32_768;

/// Writes bits least-significant first, as deflate packs them.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// Huffman codes go most-significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let mut rev = 0;
        for i in 0..len {
            rev |= ((code >> i) & 1) << (len - 1 - i);
        }
        self.put(rev, len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// The fixed literal/length code of symbol `s` (0..=287).
fn lit_code(b: &mut Bits, s: u32) {
    match s {
        0..=143 => b.code(0x30 + s, 8),
        144..=255 => b.code(0x190 + s - 144, 9),
        256..=279 => b.code(s - 256, 7),
        _ => b.code(0xC0 + s - 280, 8),
    }
}

fn put_match(b: &mut Bits, len: usize, dist: usize) {
    let li = LEN_BASE
        .iter()
        .rposition(|&x| usize::from(x) <= len)
        .unwrap_or(0);
    lit_code(b, 257 + li as u32);
    b.put(
        (len - usize::from(LEN_BASE[li])) as u32,
        u32::from(LEN_EXTRA[li]),
    );
    let di = DIST_BASE
        .iter()
        .rposition(|&x| usize::from(x) <= dist)
        .unwrap_or(0);
    b.code(di as u32, 5);
    b.put(
        (dist - usize::from(DIST_BASE[di])) as u32,
        u32::from(DIST_EXTRA[di]),
    );
}

fn run_len(data: &[u8], i: usize, dist: usize) -> usize {
    if dist == 0 || dist > i || dist > MAX_DISTANCE {
        return 0;
    }
    let mut n = 0;
    while i + n < data.len() && n < MAX_MATCH && data[i + n] == data[i + n - dist] {
        n += 1;
    }
    n
}

/// zlib stream of one fixed-Huffman deflate block, matching only at
/// distance 1 and `stride`.
pub fn zlib(data: &[u8], stride: usize) -> Vec<u8> {
    let mut b = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // final block
    b.put(1, 2); // fixed Huffman
    let mut i = 0;
    while i < data.len() {
        let (l1, l2) = (run_len(data, i, 1), run_len(data, i, stride));
        let (len, dist) = if l2 >= l1 { (l2, stride) } else { (l1, 1) };
        if len >= 3 {
            put_match(&mut b, len, dist);
            i += len;
        } else {
            lit_code(&mut b, u32::from(data[i]));
            i += 1;
        }
    }
    lit_code(&mut b, 256);
    let mut out = b.finish();
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes keep the sums below 2^32 before the modulo (RFC 1950).
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &x in data {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Encode `width x height` palette indices (row-major) with `palette` RGB colours.
pub fn encode(width: u32, height: u32, pixels: &[u8], palette: &[[u8; 3]]) -> Vec<u8> {
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]); // 8-bit palette, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    let plte: Vec<u8> = palette.iter().flatten().copied().collect();
    chunk(&mut out, b"PLTE", &plte);
    // Every row starts with filter type 0 (none).
    let w = width as usize;
    let mut raw = Vec::with_capacity((w + 1) * height as usize);
    for row in pixels.chunks(w.max(1)).take(height as usize) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    chunk(&mut out, b"IDAT", &zlib(&raw, w + 1));
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_vectors() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn flat_image_compresses_and_has_png_structure() {
        let (w, h) = (400u32, 300u32);
        let px = vec![0u8; (w * h) as usize];
        let png = encode(w, h, &px, &[[255, 255, 255]]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert!(png.len() < 4_000, "{} bytes for a flat image", png.len());
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
    }

    #[test]
    fn match_lengths_and_distances_use_the_right_codes() {
        // A literal, then a run the encoder must express as matches of
        // every length class; the stream must end with adler32 of the input.
        let mut data = vec![7u8];
        data.extend(std::iter::repeat_n(7u8, 1000));
        let z = zlib(&data, 11);
        assert_eq!(&z[..2], &[0x78, 0x01]);
        assert_eq!(&z[z.len() - 4..], &adler32(&data).to_be_bytes());
        assert!(z.len() < 30);
    }
}
