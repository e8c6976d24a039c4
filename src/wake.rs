//! Wakers that say which input woke a task.
//!
//! A task that waits on several inputs (channels, futures) polls each with a
//! waker of its own: waking it marks the input's bit, then wakes the task. A
//! wake-up then polls only the inputs that were marked, not all of them; for
//! the session task and the server's connection loop that used to be most of
//! the cost of a wake-up. Used by `pipeline::engine` and `server::connection`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// `N` inputs (at most 8), input `i` being bit `1 << i`, and the bits of
/// those that signalled since they were last taken or polled.
pub(crate) struct InputMarks<const N: usize> {
    marks: Arc<Marks>,
    wakers: [Waker; N],
}

struct Marks {
    bits: AtomicU8,
    task: Mutex<Option<Waker>>,
}

/// The waker of one input: it marks the input, then wakes the task.
struct InputWaker {
    marks: Arc<Marks>,
    bit: u8,
}

impl Wake for InputWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.marks.bits.fetch_or(self.bit, Ordering::AcqRel);
        if let Some(task) = &*self
            .marks
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            task.wake_by_ref();
        }
    }
}

impl<const N: usize> InputMarks<N> {
    /// `N` inputs, those in `marked` marked from the start (so they are
    /// polled, and register, once).
    pub(crate) fn new(marked: u8) -> Self {
        const { assert!(N <= 8, "one bit per input in a u8") };
        let marks = Arc::new(Marks {
            bits: AtomicU8::new(marked),
            task: Mutex::new(None),
        });
        let wakers = std::array::from_fn(|i| {
            Waker::from(Arc::new(InputWaker {
                marks: marks.clone(),
                bit: 1 << i,
            }))
        });
        InputMarks { marks, wakers }
    }

    /// Keeps `task` as the waker the inputs' wakers wake.
    pub(crate) fn register(&self, task: &Waker) {
        let mut slot = self
            .marks
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(task)) {
            *slot = Some(task.clone());
        }
    }

    /// The waker to poll the input `bit` with.
    pub(crate) fn waker(&self, bit: u8) -> &Waker {
        &self.wakers[bit.trailing_zeros() as usize]
    }

    /// Marks `bits`: inputs to poll at the next wake-up.
    pub(crate) fn mark(&self, bits: u8) {
        if bits != 0 {
            self.marks.bits.fetch_or(bits, Ordering::AcqRel);
        }
    }

    /// Whether the input `bit` is marked (cheaper to read than its channel).
    pub(crate) fn marked(&self, bit: u8) -> bool {
        self.marks.bits.load(Ordering::Acquire) & bit != 0
    }

    /// The marked inputs, unmarking them all.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn take(&self) -> u8 {
        // Mostly nothing is marked: a plain load, not a locked swap, for
        // that. A mark set after the load wakes the task again.
        if self.marks.bits.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.marks.bits.swap(0, Ordering::AcqRel)
    }

    /// Polls the input `bit` with its own waker if it is marked. It stays
    /// marked after an item (more may be waiting), unmarked once pending.
    pub(crate) fn poll<T>(
        &self,
        bit: u8,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Option<T> {
        let bits = &self.marks.bits;
        if bits.load(Ordering::Acquire) & bit == 0 {
            return None;
        }
        // Unmark first: a wake from here on marks it again.
        bits.fetch_and(!bit, Ordering::AcqRel);
        match poll(&mut Context::from_waker(self.waker(bit))) {
            Poll::Ready(v) => {
                bits.fetch_or(bit, Ordering::AcqRel);
                Some(v)
            }
            Poll::Pending => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_waker_marks_its_input_and_wakes_the_task() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(0.into()));
        let task = Waker::from(count.clone());
        let inputs = InputMarks::<3>::new(0b001);
        inputs.register(&task);
        assert_eq!(inputs.take(), 0b001);
        assert_eq!(inputs.take(), 0);

        inputs.waker(0b100).wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(inputs.marked(0b100) && !inputs.marked(0b010));

        // `poll` unmarks a pending input and keeps a ready one marked.
        assert_eq!(inputs.poll(0b100, |_| Poll::<()>::Pending), None);
        assert!(!inputs.marked(0b100));
        assert_eq!(
            inputs.poll(0b100, |_| Poll::Ready(1)),
            None,
            "unmarked: not polled"
        );
        inputs.mark(0b010);
        assert_eq!(inputs.poll(0b010, |_| Poll::Ready(7)), Some(7));
        assert!(inputs.marked(0b010));
    }
}
