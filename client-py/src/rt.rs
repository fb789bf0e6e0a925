//! The one tokio runtime of the process, and the two ways Python waits on it.
//!
//! - Sync calls ([`wait`]) block the calling Python thread on the runtime
//!   with the GIL released, so other Python threads run meanwhile and the
//!   future's own CPU work (Arrow encoding in `Producer::send`) happens on
//!   the calling thread: several Python threads encode in parallel.
//! - asyncio calls ([`to_asyncio`]) spawn the future on the runtime and
//!   return an `asyncio.Future` of the running loop, completed through
//!   `loop.call_soon_threadsafe`. No thread or event loop per call; the
//!   Python future's cancellation aborts the Rust task.
//!
//! Runtime threads call into Python only through [`attach_unless_exiting`].
//! CPython ends any thread that asks for the GIL once finalization has begun
//! (`pthread_exit`); unwinding that through Rust frames aborts the whole
//! process. It happens easily: `call_soon_threadsafe` releases the GIL to
//! wake the loop, the loop completes the future, the program returns, the
//! interpreter finalizes, and the runtime thread wants the GIL back. So an
//! `atexit` hook ([`close_python_gate`]) shuts the gate and waits for the
//! calls already inside before finalization starts.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::IntoPyObjectExt;
use tokio::runtime::Runtime;

use crate::errors::BusError;

/// How often a blocked sync call wakes to let Python handle signals
/// (Ctrl-C). Short enough to feel immediate, long enough to cost nothing.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Set by the `atexit` hook: the interpreter is about to finalize.
static PYTHON_EXITING: AtomicBool = AtomicBool::new(false);
/// Runtime threads inside (or entering) [`attach_unless_exiting`].
static PYTHON_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How long the `atexit` hook waits for runtime threads already calling
/// into Python. Those calls are short (`call_soon_threadsafe`); the bound
/// only keeps a wedged thread from hanging the exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Run `f` with the GIL from a runtime thread, unless the interpreter is
/// shutting down (then `None`: nobody is waiting for the result any more).
pub fn attach_unless_exiting<R>(f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            PYTHON_CALLS.fetch_sub(1, Ordering::SeqCst);
        }
    }
    // Announce first, then check: with the hook's store-then-load (both
    // SeqCst) either this call sees the flag or the hook sees this call.
    PYTHON_CALLS.fetch_add(1, Ordering::SeqCst);
    let _leave = Leave;
    if PYTHON_EXITING.load(Ordering::SeqCst) {
        return None;
    }
    Some(Python::attach(f))
}

/// The `atexit` hook registered when the module is imported: no runtime
/// thread enters Python from now on, and those inside have left when it
/// returns. Waits with the GIL released, so they can finish.
#[pyfunction]
pub fn close_python_gate(py: Python<'_>) {
    PYTHON_EXITING.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = Instant::now() + EXIT_WAIT;
        while PYTHON_CALLS.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

pub fn runtime() -> Result<&'static Runtime, BusError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    // One worker per core (tokio's default): publishes from many Python
    // threads or tasks encode on them in parallel.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("arrowbus-io")
        .enable_all()
        .build()
        .map_err(|e| BusError::new("config", format!("cannot start the client runtime: {e}")))?;
    // Two threads may race to build it; the loser's unused runtime is dropped.
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Run `fut` to completion from a sync Python call: GIL released while it
/// runs, Ctrl-C honoured (the future is dropped, which cancels it).
pub fn wait<F, T>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = Result<T, BusError>> + Send,
    T: Send,
{
    let rt = runtime()?;
    let mut fut = std::pin::pin!(fut);
    loop {
        let step = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK_INTERVAL, &mut fut).await })
        });
        match step {
            Ok(out) => return out.map_err(PyErr::from),
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// Like [`wait`], but `fut` is never dropped halfway: when Ctrl-C stops the
/// wait, the rest of `fut` is handed to the runtime to finish (see
/// [`shielded`] for why publishes need that). It runs on the calling thread
/// until then, so concurrent Python threads encode in parallel without a
/// hop to another thread per call.
pub fn wait_shielded<F, T>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = Result<T, BusError>> + Send + 'static,
    T: Send + 'static,
{
    let rt = runtime()?;
    let mut fut = Box::pin(fut);
    loop {
        let step = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK_INTERVAL, &mut fut).await })
        });
        match step {
            Ok(out) => return out.map_err(PyErr::from),
            Err(_elapsed) => {
                if let Err(interrupted) = py.check_signals() {
                    // Deliberately detached: it ends once the frame is sent
                    // or refused; nobody waits for its outcome any more.
                    drop(rt.spawn(fut));
                    return Err(interrupted);
                }
            }
        }
    }
}

/// Run `fut` as its own task, to completion even if whoever waits for it
/// stops waiting (Ctrl-C, a cancelled asyncio task). For publishes: the Rust
/// producer's `send` writes a frame in several steps on a shared stream, and
/// dropping it halfway would leave a torn frame there. Deliberately
/// detached when the waiter goes away: it ends by itself once the frame is
/// sent or refused.
pub fn shielded<F, T>(fut: F) -> Result<impl Future<Output = Result<T, BusError>>, BusError>
where
    F: Future<Output = Result<T, BusError>> + Send + 'static,
    T: Send + 'static,
{
    let task = runtime()?.spawn(fut);
    Ok(async move {
        task.await
            .map_err(|e| BusError::new("other", format!("the publish task failed: {e}")))?
    })
}

/// Spawn `fut` on the runtime and return an `asyncio.Future` of the running
/// event loop that completes with its output. Must be called from a
/// coroutine (there must be a running loop).
pub fn to_asyncio<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, BusError>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static COMPLETE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let event_loop = GET_RUNNING_LOOP
        .import(py, "asyncio", "get_running_loop")?
        .call0()?;
    let py_future = event_loop.call_method0("create_future")?;
    let complete = COMPLETE
        .import(py, "arrowbus._async", "_complete")?
        .clone()
        .unbind();
    let (loop_ref, future_ref) = (event_loop.unbind(), py_future.clone().unbind());
    let task = runtime()?.spawn(async move {
        let out = fut.await;
        attach_unless_exiting(|py| {
            let (ok, value) = match out.map_err(|e| e.to_pyerr(py)) {
                Ok(v) => match v.into_py_any(py) {
                    Ok(obj) => (true, obj),
                    Err(e) => (false, e.into_value(py).into_any()),
                },
                Err(e) => (false, e.into_value(py).into_any()),
            };
            // Fails only when the loop is closed: nobody is waiting any more.
            let _ = loop_ref.call_method1(
                py,
                "call_soon_threadsafe",
                (complete, future_ref, ok, value),
            );
        });
    });
    py_future.call_method1(
        "add_done_callback",
        (CancelOnDone {
            task: task.abort_handle(),
        },),
    )?;
    Ok(py_future)
}

/// Done-callback of an asyncio future: when it was cancelled (a `wait_for`
/// timeout, a cancelled task), stop the Rust work behind it.
#[pyclass(frozen)]
struct CancelOnDone {
    task: tokio::task::AbortHandle,
}

#[pymethods]
impl CancelOnDone {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            self.task.abort();
        }
        Ok(())
    }
}
