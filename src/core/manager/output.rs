//! A background process's output as the service keeps it: the last `OUTPUT_CAP` bytes,
//! addressed by offsets counted from the first byte the process wrote.

use std::collections::VecDeque;

/// The last `OUTPUT_CAP` bytes of a process's output, addressed by offsets counted from its
/// first byte.
#[derive(Debug, Default)]
pub struct OutputBuffer {
    pub(super) data: VecDeque<u8>,
    /// The offset of `data[0]`: how much was dropped.
    pub(super) start: u64,
    /// The pipe reached end of file: nothing more will come.
    pub(super) complete: bool,
}

impl OutputBuffer {
    pub fn push(&mut self, bytes: &[u8], cap: usize) {
        self.data.extend(bytes);
        let over = self.data.len().saturating_sub(cap);
        self.data.drain(..over);
        self.start += over as u64;
    }

    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// Up to `max` bytes from `offset` (from the oldest kept byte when `offset` was dropped),
    /// the offset after them, and whether that is the end of all output.
    pub fn read(&self, offset: u64, max: u32) -> (Vec<u8>, u64, bool) {
        let from = offset.clamp(self.start, self.end());
        let to = (from + u64::from(max)).min(self.end());
        let skip = (from - self.start) as usize;
        let data: Vec<u8> = self
            .data
            .range(skip..skip + (to - from) as usize)
            .copied()
            .collect();
        (data, to, self.complete && to == self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_buffer_keeps_the_last_bytes_and_says_where_it_resumes() {
        let mut b = OutputBuffer::default();
        b.push(b"hello ", 8);
        b.push(b"world", 8);
        // 11 bytes written, the first 3 dropped.
        assert_eq!(b.read(0, 100), (b"lo world".to_vec(), 11, false));
        assert_eq!(b.read(5, 3), (b" wo".to_vec(), 8, false));
        assert_eq!(b.read(11, 10), (Vec::new(), 11, false));
        assert_eq!(b.read(99, 10), (Vec::new(), 11, false));
        b.complete = true;
        assert_eq!(b.read(8, 10), (b"rld".to_vec(), 11, true));
        assert_eq!(b.read(8, 2), (b"rl".to_vec(), 10, false));
    }
}
