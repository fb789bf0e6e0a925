//! The timeline picture: latency of every completed operation (log scale,
//! coloured by outcome) above throughput per second by outcome, with fault
//! windows shaded across both. Drawn on a palette canvas with a built-in
//! 3x5 pixel font (our own glyphs, so no font file or licence to ship) and
//! written by [`crate::png`].

use crate::history::{Op, OpType, Process};

// Palette indices.
const WHITE: u8 = 0;
const BLACK: u8 = 1;
const GREY: u8 = 2;
const OK: u8 = 3;
const INFO: u8 = 4;
const FAIL: u8 = 5;
const SHADE_KILL: u8 = 6;
const SHADE_PAUSE: u8 = 7;
const SHADE_PARTITION: u8 = 8;
const SHADE_OTHER: u8 = 9;
const LIGHT_GRID: u8 = 10;
const POLL_OK: u8 = 11;

const PALETTE: [[u8; 3]; 12] = [
    [255, 255, 255],
    [0, 0, 0],
    [120, 120, 120],
    [30, 140, 60],   // ok send
    [230, 150, 0],   // info
    [210, 30, 30],   // fail
    [255, 205, 205], // kill window
    [205, 220, 255], // pause window
    [255, 235, 180], // partition window
    [225, 205, 245], // other fault window
    [232, 232, 232],
    [40, 90, 200], // ok poll
];

const W: usize = 1200;
const H: usize = 720;
const LEFT: usize = 70;
const RIGHT: usize = W - 20;
const LAT_TOP: usize = 40;
const LAT_BOTTOM: usize = 420;
const RATE_TOP: usize = 470;
const RATE_BOTTOM: usize = 660;
/// Latency axis: 10^-1 ms .. 10^4 ms (0.1 ms to 10 s).
const LAT_MIN_EXP: f64 = -1.0;
const LAT_MAX_EXP: f64 = 4.0;
/// Glyphs are drawn at this many pixels per font pixel.
const SCALE: usize = 2;

/// 3x5 glyphs: five rows, bit 2 is the left column.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        '/' => [1, 1, 2, 4, 4],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '=' => [0, 7, 0, 7, 0],
        '%' => [5, 1, 2, 4, 5],
        _ => [0, 0, 0, 0, 0],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: usize, y: usize, c: u8) {
        if x < W && y < H {
            self.px[y * W + x] = c;
        }
    }
    fn rect(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: u8) {
        for y in y0..y1.min(H) {
            for x in x0..x1.min(W) {
                self.px[y * W + x] = c;
            }
        }
    }
    fn hline(&mut self, x0: usize, x1: usize, y: usize, c: u8) {
        self.rect(x0, y, x1, y + 1, c);
    }
    fn vline(&mut self, x: usize, y0: usize, y1: usize, c: u8) {
        self.rect(x, y0, x + 1, y1, c);
    }
    fn text(&mut self, x: usize, y: usize, s: &str, c: u8) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let gx = x + i * 4 * SCALE;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        self.rect(
                            gx + col * SCALE,
                            y + row * SCALE,
                            gx + (col + 1) * SCALE,
                            y + (row + 1) * SCALE,
                            c,
                        );
                    }
                }
            }
        }
    }
    fn text_width(s: &str) -> usize {
        s.chars().count() * 4 * SCALE
    }
    /// A line between two points (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: u8) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            if x >= 0 && y >= 0 {
                self.set(x as usize, y as usize, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

/// A fault window: start and end in seconds, and its kind (`f` of its start).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub from_s: f64,
    pub to_s: f64,
    pub kind: String,
}

/// Fault windows from the nemesis ops: from a fault's start to the
/// completion of the op that ends it (or the end of the history).
pub fn fault_windows(history: &[Op]) -> Vec<Window> {
    let end_s = history.last().map_or(0.0, |o| o.time as f64 / 1e9);
    let mut out = Vec::new();
    let mut open: Option<(f64, String)> = None;
    for op in history.iter().filter(|o| o.process == Process::Nemesis) {
        let t = op.time as f64 / 1e9;
        let starts = crate::schedule::FaultKind::started_by(&op.f).is_some();
        let ends = crate::schedule::FaultKind::is_end(&op.f);
        if starts && op.kind == OpType::Invoke && open.is_none() {
            open = Some((t, op.f.clone()));
        } else if ends && op.kind != OpType::Invoke {
            if let Some((from, kind)) = open.take() {
                out.push(Window {
                    from_s: from,
                    to_s: t,
                    kind,
                });
            }
        }
    }
    if let Some((from, kind)) = open {
        out.push(Window {
            from_s: from,
            to_s: end_s,
            kind,
        });
    }
    out
}

/// Render the timeline PNG of a history.
pub fn timeline(history: &[Op], title: &str) -> Vec<u8> {
    let mut c = Canvas {
        px: vec![WHITE; W * H],
    };
    // Completed client ops: (start s, latency ms, f, outcome).
    let mut points = Vec::new();
    let mut open = std::collections::HashMap::new();
    for op in history {
        let Process::Client(p) = op.process else {
            continue;
        };
        if op.kind == OpType::Invoke {
            open.insert(p, op);
        } else if let Some(inv) = open.remove(&p) {
            points.push((
                inv.time as f64 / 1e9,
                op.time.saturating_sub(inv.time) as f64 / 1e6,
                inv.f.as_str(),
                op.kind,
            ));
        }
    }
    let t_max = history
        .last()
        .map_or(1.0, |o| (o.time as f64 / 1e9).max(1.0))
        .ceil();
    let x_of = |t: f64| {
        LEFT + ((t / t_max) * (RIGHT - LEFT) as f64).clamp(0.0, (RIGHT - LEFT) as f64) as usize
    };

    // Fault windows first, so everything else draws over them.
    let windows = fault_windows(history);
    for w in &windows {
        let shade = match w.kind.as_str() {
            "kill" => SHADE_KILL,
            "pause" => SHADE_PAUSE,
            "partition" => SHADE_PARTITION,
            _ => SHADE_OTHER,
        };
        let (x0, x1) = (x_of(w.from_s), x_of(w.to_s).max(x_of(w.from_s) + 1));
        c.rect(x0, LAT_TOP, x1, LAT_BOTTOM, shade);
        c.rect(x0, RATE_TOP, x1, RATE_BOTTOM, shade);
    }

    // Latency panel: grid per decade, labels in ms.
    let lat_y = |ms: f64| {
        let e = ms.max(1e-3).log10().clamp(LAT_MIN_EXP, LAT_MAX_EXP);
        LAT_BOTTOM
            - (((e - LAT_MIN_EXP) / (LAT_MAX_EXP - LAT_MIN_EXP)) * (LAT_BOTTOM - LAT_TOP) as f64)
                as usize
    };
    for (e, label) in [
        (-1.0, "0.1"),
        (0.0, "1"),
        (1.0, "10"),
        (2.0, "100"),
        (3.0, "1000"),
        (4.0, "10000"),
    ] {
        let y = lat_y(10f64.powf(e));
        for x in (LEFT..RIGHT).step_by(4) {
            c.set(x, y, LIGHT_GRID);
        }
        c.text(
            LEFT - 8 - Canvas::text_width(label),
            y.saturating_sub(5),
            label,
            BLACK,
        );
    }
    c.text(LEFT, LAT_TOP - 16, "LATENCY MS (LOG)", BLACK);
    for &(t, ms, f, kind) in &points {
        let col = match (kind, f) {
            (OpType::Ok, "poll") => POLL_OK,
            (OpType::Ok, _) => OK,
            (OpType::Info, _) => INFO,
            _ => FAIL,
        };
        let (x, y) = (x_of(t), lat_y(ms));
        c.rect(x.saturating_sub(1), y.saturating_sub(1), x + 2, y + 2, col);
    }

    // Rate panel: completions per second by outcome.
    let secs = t_max as usize + 1;
    let mut rate = vec![[0u32; 4]; secs];
    for &(t, ms, f, kind) in &points {
        let s = ((t + ms / 1e3) as usize).min(secs - 1);
        let i = match (kind, f) {
            (OpType::Ok, "poll") => 1,
            (OpType::Ok, _) => 0,
            (OpType::Info, _) => 2,
            _ => 3,
        };
        rate[s][i] += 1;
    }
    let r_max = rate
        .iter()
        .flat_map(|r| r.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let r_top = nice_ceiling(r_max);
    let rate_y = |v: u32| {
        RATE_BOTTOM - ((f64::from(v) / f64::from(r_top)) * (RATE_BOTTOM - RATE_TOP) as f64) as usize
    };
    for v in [0, r_top / 2, r_top] {
        let y = rate_y(v);
        for x in (LEFT..RIGHT).step_by(4) {
            c.set(x, y, LIGHT_GRID);
        }
        let label = v.to_string();
        c.text(
            LEFT - 8 - Canvas::text_width(&label),
            y.saturating_sub(5),
            &label,
            BLACK,
        );
    }
    c.text(LEFT, RATE_TOP - 16, "OPS/S", BLACK);
    for (i, col) in [(0, OK), (1, POLL_OK), (2, INFO), (3, FAIL)] {
        let mut prev: Option<(i64, i64)> = None;
        for (s, r) in rate.iter().enumerate() {
            let p = (x_of(s as f64 + 0.5) as i64, rate_y(r[i]) as i64);
            if let Some(q) = prev {
                c.line(q, p, col);
            }
            prev = Some(p);
        }
    }

    // Axes and time ticks.
    for (top, bottom) in [(LAT_TOP, LAT_BOTTOM), (RATE_TOP, RATE_BOTTOM)] {
        c.vline(LEFT, top, bottom + 1, BLACK);
        c.hline(LEFT, RIGHT, bottom, BLACK);
    }
    let step = nice_ceiling((t_max / 10.0).ceil().max(1.0) as u32) as usize;
    for s in (0..=t_max as usize).step_by(step.max(1)) {
        let x = x_of(s as f64);
        c.vline(x, RATE_BOTTOM, RATE_BOTTOM + 5, BLACK);
        c.vline(x, LAT_BOTTOM, LAT_BOTTOM + 5, BLACK);
        let label = s.to_string();
        c.text(
            x.saturating_sub(Canvas::text_width(&label) / 2),
            RATE_BOTTOM + 9,
            &label,
            BLACK,
        );
    }
    c.text(
        RIGHT - Canvas::text_width("TIME S"),
        RATE_BOTTOM + 26,
        "TIME S",
        BLACK,
    );

    // Title and legend.
    c.text(LEFT, 8, title, BLACK);
    let mut x = LEFT;
    let y = H - 22;
    for (col, label) in [
        (OK, "SEND OK"),
        (POLL_OK, "POLL OK"),
        (INFO, "INFO"),
        (FAIL, "FAIL"),
        (SHADE_KILL, "KILL"),
        (SHADE_PAUSE, "PAUSE"),
        (SHADE_PARTITION, "PARTITION"),
        (SHADE_OTHER, "OTHER FAULT"),
    ] {
        c.rect(x, y, x + 10, y + 10, col);
        c.text(x + 14, y, label, BLACK);
        x += 14 + Canvas::text_width(label) + 20;
    }
    let _ = GREY;
    crate::png::encode(W as u32, H as u32, &c.px, &PALETTE)
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: u32) -> u32 {
    let mut p = 1u32;
    loop {
        for m in [1, 2, 5] {
            if let Some(x) = p.checked_mul(m) {
                if x >= v {
                    return x;
                }
            }
        }
        match p.checked_mul(10) {
            Some(n) => p = n,
            None => return u32::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::OpValue;

    fn nem(time_s: u64, kind: OpType, f: &str) -> Op {
        Op {
            index: 0,
            time: time_s * 1_000_000_000,
            process: Process::Nemesis,
            kind,
            f: f.into(),
            value: OpValue::Other(serde_json::json!({})),
            error: None,
            node: None,
            final_read: false,
        }
    }

    #[test]
    fn windows_pair_fault_starts_with_their_ends() {
        let h = vec![
            nem(5, OpType::Invoke, "kill"),
            nem(5, OpType::Info, "kill"),
            nem(9, OpType::Invoke, "restart"),
            nem(10, OpType::Info, "restart"),
            nem(20, OpType::Invoke, "partition"),
            nem(20, OpType::Info, "partition"),
            nem(30, OpType::Info, "heal"),
            nem(40, OpType::Invoke, "pause"),
            nem(41, OpType::Info, "pause"),
        ];
        let w = fault_windows(&h);
        assert_eq!(w.len(), 3);
        assert_eq!(
            (w[0].from_s, w[0].to_s, w[0].kind.as_str()),
            (5.0, 10.0, "kill")
        );
        assert_eq!((w[1].from_s, w[1].to_s), (20.0, 30.0));
        // still open at the end of the history
        assert_eq!((w[2].from_s, w[2].to_s), (40.0, 41.0));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(101), 200);
    }

    #[test]
    fn renders_a_png() {
        let h = vec![
            nem(1, OpType::Invoke, "kill"),
            nem(3, OpType::Info, "restart"),
        ];
        let png = timeline(&h, "TEST");
        assert_eq!(&png[1..4], b"PNG");
    }
}
