//! Partitions of one topic read in step: the next read always goes to the partition least far
//! through what it holds (its share of the records between its first kept offset and its
//! end), so that partitions which cover the same stretch of event time, however unequal their
//! sizes, stay close in event time. Read round-robin instead, a large partition fell behind
//! the rest all through a replay, and the watermark (their minimum) with it: the rows waiting
//! on it grew with the length of the log.

/// `read` of `of` records, compared exactly.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fraction {
    read: u64,
    of: u64,
}

impl Fraction {
    /// How far a reader at `next` is through a partition spanning `span` (first kept offset,
    /// end): records read ÷ records held.
    pub(crate) fn through(next: u64, span: Option<&(u64, u64)>) -> Fraction {
        match span {
            Some(&(first, end)) if end > first => Fraction {
                read: next.clamp(first, end) - first,
                of: end - first,
            },
            // An empty partition (or one the reader does not know) is read first: it costs
            // nothing to find it has nothing.
            _ => Fraction { read: 0, of: 1 },
        }
    }

    pub(crate) fn cmp_fraction(self, other: Fraction) -> std::cmp::Ordering {
        (u128::from(self.read) * u128::from(other.of))
            .cmp(&(u128::from(other.read) * u128::from(self.of)))
    }
}
