//! Output bounded for a model: what is longer than its bound comes back as its head and its
//! tail with a note of how much was left out between them, never as a reply too long to read
//! nor as a cut that hides the end (where a failing command says why).

use std::collections::VecDeque;

/// A stream's output as it comes, keeping at most `limit` bytes: the first `limit` while that
/// is all there is, then the first half and the last half.
#[derive(Debug)]
pub struct HeadTail {
    limit: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

/// A bounded stream as text, and what the bound left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded {
    pub text: String,
    pub total_bytes: u64,
    pub omitted_bytes: u64,
}

impl HeadTail {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            head: Vec::new(),
            tail: VecDeque::new(),
            total: 0,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.limit - self.head.len();
        let now = room.min(data.len());
        self.head.extend_from_slice(&data[..now]);
        data = &data[now..];
        // The tail's share of the bound: the half the head does not take.
        let keep = self.limit - self.limit / 2;
        if data.len() >= keep {
            self.tail.clear();
            self.tail.extend(&data[data.len() - keep..]);
            return;
        }
        let over = (self.tail.len() + data.len()).saturating_sub(keep);
        self.tail.drain(..over);
        self.tail.extend(data);
    }

    /// The text (UTF-8, invalid bytes replaced) with the note where bytes were left out;
    /// `what` names the stream in the note ("stdout").
    pub fn finish(self, what: &str) -> Bounded {
        if self.total <= self.limit as u64 {
            return Bounded {
                text: String::from_utf8_lossy(&self.head).into_owned(),
                total_bytes: self.total,
                omitted_bytes: 0,
            };
        }
        let half = self.limit / 2;
        let keep_tail = self.limit - half;
        // The last bytes: those past the head, after the head's own second half.
        let mut tail: Vec<u8> = self.head[half..].to_vec();
        tail.extend(self.tail);
        let tail = &tail[tail.len().saturating_sub(keep_tail)..];
        let head = trim_end_to_char(&self.head[..half]);
        let tail = trim_start_to_char(tail);
        // What is shown and what is said to be left out add up to the whole.
        let omitted = self.total - (head.len() + tail.len()) as u64;
        Bounded {
            text: format!(
                "{}\n[... {omitted} bytes of {what} left out: {} bytes in all, the first {} and \
                 the last {} shown; ask for a larger max_output_bytes, or redirect the output \
                 to a file and read parts of it ...]\n{}",
                String::from_utf8_lossy(head),
                self.total,
                head.len(),
                tail.len(),
                String::from_utf8_lossy(tail)
            ),
            total_bytes: self.total,
            omitted_bytes: omitted,
        }
    }
}

/// `b` without a UTF-8 sequence cut at its end (at most 3 bytes dropped).
fn trim_end_to_char(b: &[u8]) -> &[u8] {
    for cut in 0..4.min(b.len() + 1) {
        let s = &b[..b.len() - cut];
        match std::str::from_utf8(s) {
            Ok(_) => return s,
            Err(e) if e.error_len().is_some() => return b, // invalid anyway: keep it all
            Err(_) => {}
        }
    }
    b
}

/// `b` without the continuation bytes of a UTF-8 sequence cut at its start.
fn trim_start_to_char(b: &[u8]) -> &[u8] {
    let skip = b
        .iter()
        .take(3)
        .take_while(|&&c| c & 0b1100_0000 == 0b1000_0000)
        .count();
    &b[skip..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(limit: usize, chunks: &[&[u8]]) -> Bounded {
        let mut h = HeadTail::new(limit);
        for c in chunks {
            h.push(c);
        }
        h.finish("stdout")
    }

    #[test]
    fn what_fits_comes_back_whole() {
        let b = bounded(10, &[b"hello", b" you"]);
        assert_eq!(b.text, "hello you");
        assert_eq!((b.total_bytes, b.omitted_bytes), (9, 0));
        assert_eq!(bounded(4, &[b"abcd"]).text, "abcd");
    }

    #[test]
    fn what_is_longer_keeps_its_head_and_its_tail_whatever_the_chunks() {
        let all: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in [1, 3, 7, 100, 1000] {
            let chunks: Vec<&[u8]> = all.chunks(chunk).collect();
            let b = bounded(100, &chunks);
            let (head, rest) = b.text.split_once("\n[... ").unwrap();
            let (note, tail) = rest.split_once(" ...]\n").unwrap();
            assert_eq!(head.as_bytes(), &all[..50], "chunks of {chunk}");
            assert_eq!(tail.as_bytes(), &all[950..], "chunks of {chunk}");
            assert!(note.starts_with("900 bytes of stdout left out: 1000 bytes in all"));
            assert_eq!((b.total_bytes, b.omitted_bytes), (1000, 900));
        }
        // Just over the bound: the tail comes partly from what the head took first.
        let b = bounded(10, &[b"0123456789ab"]);
        assert!(b.text.starts_with("01234\n[... 2 bytes"), "{}", b.text);
        assert!(b.text.ends_with("]\n789ab"), "{}", b.text);
    }

    #[test]
    fn any_bound_odd_or_even_keeps_the_true_head_and_tail() {
        // A reference: the first half and the last half of everything.
        let all: Vec<u8> = (0..997u32).map(|i| b'a' + (i * 7 % 26) as u8).collect();
        for limit in [2usize, 3, 11, 50, 51, 100, 101] {
            for chunk in [1usize, 2, 5, 64, 997] {
                let mut h = HeadTail::new(limit);
                for c in all.chunks(chunk) {
                    h.push(c);
                }
                let b = h.finish("stdout");
                let (head, rest) = b.text.split_once("\n[... ").unwrap();
                let tail = rest.split_once(" ...]\n").unwrap().1;
                let (half, keep) = (limit / 2, limit - limit / 2);
                assert_eq!(
                    head.as_bytes(),
                    &all[..half],
                    "limit {limit}, chunks {chunk}"
                );
                assert_eq!(
                    tail.as_bytes(),
                    &all[all.len() - keep..],
                    "limit {limit}, chunks {chunk}"
                );
                assert_eq!(b.omitted_bytes, (all.len() - limit) as u64);
            }
        }
    }

    #[test]
    fn no_character_is_cut_in_two() {
        let text = "é".repeat(100); // 200 bytes
        let b = bounded(51, &[text.as_bytes()]);
        let (head, rest) = b.text.split_once("\n[... ").unwrap();
        let tail = rest.split_once(" ...]\n").unwrap().1;
        assert!(
            !head.contains('\u{fffd}') && !tail.contains('\u{fffd}'),
            "{}",
            b.text
        );
        // 25 bytes of head hold 12 characters and a half; 26 of tail, 13 whole.
        assert_eq!(head, "é".repeat(12));
        assert_eq!(tail, "é".repeat(13));
        assert_eq!(
            b.omitted_bytes,
            200 - 24 - 26,
            "what is shown and left out add up"
        );
        // Four-byte characters, an odd bound: no replacement character either end.
        let text = "😀".repeat(50);
        let b = bounded(23, &[text.as_bytes()]);
        assert!(!b.text.contains('\u{fffd}'), "{}", b.text);
    }
}
