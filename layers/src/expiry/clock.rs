use std::time::SystemTime;

/// The time source of the expiry layer.
///
/// Implemented for closures `Fn() -> SystemTime`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use upgate_layers::expiry::Clock;
///
/// let fixed = || SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
/// assert_eq!(fixed.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
/// ```
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

impl<F> Clock for F
where
    F: Fn() -> SystemTime + Send + Sync + 'static,
{
    fn now(&self) -> SystemTime {
        self()
    }
}

/// [`SystemTime::now`].
///
/// ```
/// use upgate_layers::expiry::{Clock, SystemClock};
/// assert!(SystemClock.now() > std::time::SystemTime::UNIX_EPOCH);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall-clock time that advances with `tokio::time`: the system time when it was
/// created plus the (pausable) tokio time elapsed since. For tests using
/// `tokio::time::pause()` and `advance()`.
///
/// ```
/// use std::time::Duration;
/// use upgate_layers::expiry::{Clock, TokioClock};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let clock = TokioClock::new();
/// let before = clock.now();
/// tokio::time::advance(Duration::from_secs(90)).await;
/// assert_eq!(clock.now().duration_since(before).unwrap(), Duration::from_secs(90));
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    wall: SystemTime,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock starting at the current system time.
    ///
    /// ```
    /// let clock = upgate_layers::expiry::TokioClock::new();
    /// # let _ = clock;
    /// ```
    pub fn new() -> Self {
        Self::starting_at(SystemTime::now())
    }

    /// A clock starting at `wall`.
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use upgate_layers::expiry::{Clock, TokioClock};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let clock = TokioClock::starting_at(SystemTime::UNIX_EPOCH);
    /// assert_eq!(clock.now(), SystemTime::UNIX_EPOCH);
    /// # }
    /// ```
    pub fn starting_at(wall: SystemTime) -> Self {
        Self {
            wall,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.origin.elapsed()
    }
}
