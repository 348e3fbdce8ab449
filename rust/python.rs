//! The one thin PyO3 binding (`sdft._kernel`): Python objects in, kernel views out, pure work with
//! the GIL released (`py.detach`), owned output memory handed to NumPy without a copy.
//!
//! Exception policy (the same in every function): a Python object of the wrong type or dtype is a
//! `TypeError`; a well-typed value that is out of range, of the wrong shape or inconsistent is a
//! `ValueError`; a broken internal invariant is a `RuntimeError`. Every message names the datum
//! and, for per-value problems, the position. The kernel's errors become Python exceptions in one
//! place: `impl From<KernelError> for PyErr`.

use crate::buffer::{Zeroable, ZeroedBuffer};
use crate::kernel::{
    build_csr_batch, build_dense_batch, completion_positions, consulted_teacher_rows,
    dense_block_offsets, position_context, thread_count, Config, CsrTargets, DatumInput, DenseRows,
    GatheredRows, KernelError, LogprobCell, Stats, Teacher, TokenCell, KERNEL_VERSION,
    MAX_TOKEN_ID, MAX_TOPK, SENTINEL_LOGPROB,
};
use numpy::ndarray::ArrayView2;
use numpy::{
    Element, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyTuple};
use std::ops::Range;

impl From<KernelError> for PyErr {
    fn from(error: KernelError) -> PyErr {
        match error {
            KernelError::Internal(_) => PyRuntimeError::new_err(error.to_string()),
            KernelError::Argument(_) | KernelError::Datum { .. } | KernelError::OutOfMemory(_) => {
                PyValueError::new_err(error.to_string())
            }
        }
    }
}

fn type_error(datum: usize, message: impl std::fmt::Display) -> PyErr {
    PyTypeError::new_err(format!("datum {datum}: {message}"))
}

fn value_error(datum: usize, message: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("datum {datum}: {message}"))
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "<unknown>".to_string())
}

fn describe_array(value: &Bound<'_, PyAny>) -> String {
    match value.cast::<PyUntypedArray>() {
        Ok(array) => format!("a {}-D {} array", array.ndim(), array.dtype()),
        Err(_) => type_name(value),
    }
}

// ---------------------------------------------------------------------------------------------
// One datum's Python objects, borrowed for the kernel

enum TeacherGuard<'py> {
    Missing,
    I32F32(PyReadonlyArray2<'py, i32>, PyReadonlyArray2<'py, f32>),
    I32F64(PyReadonlyArray2<'py, i32>, PyReadonlyArray2<'py, f64>),
    I64F32(PyReadonlyArray2<'py, i64>, PyReadonlyArray2<'py, f32>),
    I64F64(PyReadonlyArray2<'py, i64>, PyReadonlyArray2<'py, f64>),
    /// The list view, converted right before its datum is built.
    List(Bound<'py, PyList>),
}

/// Keeps the NumPy borrows alive while the kernel reads the views without the GIL.
struct DatumGuard<'py> {
    mask: PyReadonlyArray1<'py, f32>,
    completion_len: usize,
    teacher_prompt_len: usize,
    teacher: TeacherGuard<'py>,
}

fn dense_rows<'a, I: TokenCell + Element, F: LogprobCell + Element>(
    datum: usize,
    ids: &'a PyReadonlyArray2<'_, I>,
    logprobs: &'a PyReadonlyArray2<'_, F>,
) -> Result<DenseRows<'a, I, F>, KernelError> {
    DenseRows::new(datum, ids.as_array(), logprobs.as_array())
}

impl DatumGuard<'_> {
    fn is_list(&self) -> bool {
        matches!(self.teacher, TeacherGuard::List(_))
    }

    fn rows(&self) -> usize {
        self.mask.as_array().len()
    }

    /// The kernel's view of datum `datum`; a list-view teacher is read from `gathered`.
    fn view<'a>(
        &'a self,
        datum: usize,
        gathered: &'a GatheredRows,
    ) -> Result<DatumInput<'a>, KernelError> {
        let teacher = match &self.teacher {
            TeacherGuard::Missing => Teacher::Missing,
            TeacherGuard::I32F32(ids, lps) => Teacher::DenseI32F32(dense_rows(datum, ids, lps)?),
            TeacherGuard::I32F64(ids, lps) => Teacher::DenseI32F64(dense_rows(datum, ids, lps)?),
            TeacherGuard::I64F32(ids, lps) => Teacher::DenseI64F32(dense_rows(datum, ids, lps)?),
            TeacherGuard::I64F64(ids, lps) => Teacher::DenseI64F64(dense_rows(datum, ids, lps)?),
            TeacherGuard::List(_) => Teacher::Ragged(gathered.rows()),
        };
        Ok(DatumInput {
            mask: self.mask.as_array(),
            completion_len: self.completion_len,
            teacher_prompt_len: self.teacher_prompt_len,
            teacher,
        })
    }
}

const ITEM_SHAPE: &str = "expected a (mask, completion_len, teacher_prompt_len, teacher) tuple";

/// Borrows one `(mask, completion_len, teacher_prompt_len, teacher)` item.
fn extract_datum<'py>(datum: usize, item: &Bound<'py, PyAny>) -> PyResult<DatumGuard<'py>> {
    let fields = item
        .cast::<PyTuple>()
        .map_err(|_| type_error(datum, ITEM_SHAPE))?;
    if fields.len() != 4 {
        return Err(type_error(datum, ITEM_SHAPE));
    }
    Ok(DatumGuard {
        mask: extract_mask(datum, &fields.get_item(0)?)?,
        completion_len: extract_count(datum, "completion_len", &fields.get_item(1)?)?,
        teacher_prompt_len: extract_count(datum, "teacher_prompt_len", &fields.get_item(2)?)?,
        teacher: extract_teacher(datum, &fields.get_item(3)?)?,
    })
}

fn extract_count(datum: usize, name: &str, value: &Bound<'_, PyAny>) -> PyResult<usize> {
    if value.is_instance_of::<PyBool>() {
        return Err(type_error(
            datum,
            format!("{name} must be an int, got bool"),
        ));
    }
    let number = match value.extract::<i64>() {
        Ok(number) => number,
        // An int that does not fit in i64 is an out-of-range value, not a wrong type.
        Err(err) if err.is_instance_of::<PyOverflowError>(value.py()) => {
            return Err(value_error(
                datum,
                format!("{name} must be a non-negative int below 2**63, got {value}"),
            ));
        }
        Err(_) => {
            return Err(type_error(
                datum,
                format!("{name} must be an int, got {}", type_name(value)),
            ));
        }
    };
    usize::try_from(number)
        .map_err(|_| value_error(datum, format!("{name} must be >= 0, got {number}")))
}

fn extract_mask<'py>(
    datum: usize,
    value: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray1<'py, f32>> {
    let array = value.cast::<PyArray1<f32>>().map_err(|_| {
        type_error(
            datum,
            format!(
                "mask must be a 1-D float32 numpy array, got {}",
                describe_array(value)
            ),
        )
    })?;
    array
        .try_readonly()
        .map_err(|e| value_error(datum, format!("mask cannot be read: {e}")))
}

fn extract_teacher<'py>(datum: usize, teacher: &Bound<'py, PyAny>) -> PyResult<TeacherGuard<'py>> {
    if teacher.is_none() {
        Ok(TeacherGuard::Missing)
    } else if let Ok(rows) = teacher.cast::<PyList>() {
        Ok(TeacherGuard::List(rows.clone()))
    } else if let Ok(pair) = teacher.cast::<PyTuple>() {
        extract_dense_teacher(datum, pair)
    } else {
        Err(type_error(
            datum,
            format!(
                "teacher must be None, a list of rows or a (token_ids, logprobs) tuple, got {}",
                type_name(teacher)
            ),
        ))
    }
}

/// Borrows a 2-D array of one of two element types.
enum Either2<'py, A: Element, B: Element> {
    A(PyReadonlyArray2<'py, A>),
    B(PyReadonlyArray2<'py, B>),
}

fn extract_dense<'py, A: Element, B: Element>(
    datum: usize,
    name: &str,
    allowed: &str,
    value: &Bound<'py, PyAny>,
) -> PyResult<Either2<'py, A, B>> {
    let untyped = value.cast::<PyUntypedArray>().map_err(|_| {
        type_error(
            datum,
            format!(
                "teacher {name} must be a numpy array, got {}",
                type_name(value)
            ),
        )
    })?;
    if untyped.ndim() != 2 {
        return Err(value_error(
            datum,
            format!(
                "teacher {name} must be 2-D (rows, K), got shape {:?}",
                untyped.shape()
            ),
        ));
    }
    let readonly_error =
        |e: numpy::BorrowError| value_error(datum, format!("teacher {name} cannot be read: {e}"));
    if let Ok(array) = value.cast::<PyArray2<A>>() {
        return Ok(Either2::A(array.try_readonly().map_err(readonly_error)?));
    }
    if let Ok(array) = value.cast::<PyArray2<B>>() {
        return Ok(Either2::B(array.try_readonly().map_err(readonly_error)?));
    }
    Err(type_error(
        datum,
        format!(
            "teacher {name} dtype must be {allowed}, got {}",
            untyped.dtype()
        ),
    ))
}

fn extract_dense_teacher<'py>(
    datum: usize,
    pair: &Bound<'py, PyTuple>,
) -> PyResult<TeacherGuard<'py>> {
    if pair.len() != 2 {
        return Err(type_error(
            datum,
            format!(
                "dense teacher must be a (token_ids, logprobs) pair, got a tuple of {}",
                pair.len()
            ),
        ));
    }
    let ids = extract_dense::<i32, i64>(datum, "token_ids", "int32 or int64", &pair.get_item(0)?)?;
    let lps =
        extract_dense::<f32, f64>(datum, "logprobs", "float32 or float64", &pair.get_item(1)?)?;
    Ok(match (ids, lps) {
        (Either2::A(ids), Either2::A(lps)) => TeacherGuard::I32F32(ids, lps),
        (Either2::A(ids), Either2::B(lps)) => TeacherGuard::I32F64(ids, lps),
        (Either2::B(ids), Either2::A(lps)) => TeacherGuard::I64F32(ids, lps),
        (Either2::B(ids), Either2::B(lps)) => TeacherGuard::I64F64(ids, lps),
    })
}

// ---------------------------------------------------------------------------------------------
// The list view: only the rows the kernel will read are converted

/// What is wrong with one `(token_id, logprob)` entry.
enum EntryProblem {
    Type(String),
    Value(String),
}

/// What is wrong with one list-view row, before its position is put into words.
enum RowProblem {
    /// Neither `None`, a list nor a tuple (the type's name).
    NotARow(String),
    Entry {
        entry: usize,
        problem: EntryProblem,
    },
    /// Python raised while the row was read.
    Python(PyErr),
}

/// Converts the rows the kernel will read from datum `datum`'s list view (`None` or a list of
/// `(token_id, logprob)` pairs per row) into `gathered`. Only the first `topk` entries of each
/// row are touched.
fn gather_list_rows(
    datum: usize,
    guard: &DatumGuard<'_>,
    rows: &Bound<'_, PyList>,
    config: &Config,
    gathered: &mut GatheredRows,
) -> PyResult<()> {
    let num_rows = rows.len();
    let window = consulted_teacher_rows(
        guard.mask.as_array(),
        guard.completion_len,
        guard.teacher_prompt_len,
        config.skip_first_n,
    );
    let window = window.start.min(num_rows)..window.end.min(num_rows);
    gathered.start(num_rows, window.start);
    for row in window {
        let item = rows.get_item(row)?;
        let take = |len: usize| len.min(config.topk);
        let outcome = if item.is_none() {
            gathered.push_none_row();
            Ok(())
        } else if let Ok(entries) = item.cast::<PyList>() {
            gather_row(take(entries.len()), |i| entries.get_item(i), gathered)
        } else if let Ok(entries) = item.cast::<PyTuple>() {
            gather_row(take(entries.len()), |i| entries.get_item(i), gathered)
        } else {
            Err(RowProblem::NotARow(type_name(&item)))
        };
        outcome.map_err(|problem| row_error(datum, guard, row, problem))?;
    }
    Ok(())
}

/// Converts the first `take` entries of a row (a list or a tuple, read through `get`).
fn gather_row<'py>(
    take: usize,
    get: impl Fn(usize) -> PyResult<Bound<'py, PyAny>>,
    gathered: &mut GatheredRows,
) -> Result<(), RowProblem> {
    for entry in 0..take {
        let item = get(entry).map_err(RowProblem::Python)?;
        let (id, logprob) =
            extract_entry(&item).map_err(|problem| RowProblem::Entry { entry, problem })?;
        gathered.push_entry(id, logprob);
    }
    gathered.finish_row();
    Ok(())
}

/// The exception for a bad list-view row, naming where teacher row `row` sits in the datum.
#[cold]
fn row_error(datum: usize, guard: &DatumGuard<'_>, row: usize, problem: RowProblem) -> PyErr {
    let (is_type, problem) = match problem {
        RowProblem::Python(err) => return err,
        RowProblem::NotARow(name) => (
            true,
            format!(
                ": teacher row must be None or a list of (token_id, logprob) pairs, got {name}"
            ),
        ),
        RowProblem::Entry { entry, problem } => match problem {
            EntryProblem::Type(message) => (true, format!(", entry {entry}: {message}")),
            EntryProblem::Value(message) => (false, format!(", entry {entry}: {message}")),
        },
    };
    let t = row.saturating_sub(guard.teacher_prompt_len);
    let Some(student_pos) = completion_positions(guard.mask.as_array()).nth(t) else {
        return KernelError::internal(format!(
            "datum {datum}: teacher row {row} has no completion position"
        ))
        .into();
    };
    let message = format!("{}{problem}", position_context(t, student_pos, row));
    if is_type {
        type_error(datum, message)
    } else {
        value_error(datum, message)
    }
}

fn not_a_pair(entry: &Bound<'_, PyAny>) -> EntryProblem {
    EntryProblem::Type(format!(
        "entry must be a (token_id, logprob) pair, got {}",
        type_name(entry)
    ))
}

/// The two items of a pair given as a tuple or a list (`kind`) of `len` items read through `get`.
fn pair_items<'py>(
    entry: &Bound<'py, PyAny>,
    kind: &str,
    len: usize,
    get: impl Fn(usize) -> PyResult<Bound<'py, PyAny>>,
) -> Result<(Bound<'py, PyAny>, Bound<'py, PyAny>), EntryProblem> {
    if len != 2 {
        return Err(EntryProblem::Type(format!(
            "entry must be a (token_id, logprob) pair, got a {kind} of {len}"
        )));
    }
    let id = get(0).map_err(|_| not_a_pair(entry))?;
    let logprob = get(1).map_err(|_| not_a_pair(entry))?;
    Ok((id, logprob))
}

/// One `(token_id, logprob)` entry.
fn extract_entry(entry: &Bound<'_, PyAny>) -> Result<(i64, f64), EntryProblem> {
    let (id, logprob) = if let Ok(pair) = entry.cast::<PyTuple>() {
        pair_items(entry, "tuple", pair.len(), |i| pair.get_item(i))?
    } else if let Ok(pair) = entry.cast::<PyList>() {
        pair_items(entry, "list", pair.len(), |i| pair.get_item(i))?
    } else {
        return Err(not_a_pair(entry));
    };
    if id.is_instance_of::<PyBool>() {
        return Err(EntryProblem::Type(
            "token id must be an int, got bool".to_string(),
        ));
    }
    let id = match id.extract::<i64>() {
        Ok(id) => id,
        Err(err) if err.is_instance_of::<PyOverflowError>(id.py()) => {
            return Err(EntryProblem::Value(format!(
                "token id {id} is outside [0, {MAX_TOKEN_ID}]"
            )));
        }
        Err(_) => {
            return Err(EntryProblem::Type(format!(
                "token id must be an int, got {}",
                type_name(&id)
            )))
        }
    };
    if logprob.is_instance_of::<PyBool>() {
        return Err(EntryProblem::Type(
            "logprob must be a float, got bool".to_string(),
        ));
    }
    let logprob = logprob.extract::<f64>().map_err(|_| {
        EntryProblem::Type(format!(
            "logprob must be a float, got {}",
            type_name(&logprob)
        ))
    })?;
    Ok((id, logprob))
}

// ---------------------------------------------------------------------------------------------
// Outputs

/// Owner of a batch's dense output memory: the base object of every NumPy array viewing it, so
/// the memory lives exactly as long as the last of those arrays.
#[pyclass(frozen, module = "sdft._kernel")]
struct OutputBuffer {
    storage: OutputStorage,
}

enum OutputStorage {
    TargetTokens(ZeroedBuffer<i64>),
    Weights(ZeroedBuffer<f32>),
}

#[pymethods]
impl OutputBuffer {
    /// Bytes of output memory this buffer owns (all datums' blocks of one tensor).
    #[getter]
    fn nbytes(&self) -> usize {
        match &self.storage {
            OutputStorage::TargetTokens(buffer) => buffer.len() * std::mem::size_of::<i64>(),
            OutputStorage::Weights(buffer) => buffer.len() * std::mem::size_of::<f32>(),
        }
    }
}

/// `(rows, topk)` NumPy views, one per datum, into a buffer holding the blocks back to back.
fn views_into<'py, T: Element + Zeroable>(
    py: Python<'py>,
    mut buffer: ZeroedBuffer<T>,
    wrap: fn(ZeroedBuffer<T>) -> OutputStorage,
    rows: &[usize],
    topk: usize,
) -> PyResult<Vec<Bound<'py, PyArray2<T>>>> {
    let base = buffer.as_mut_ptr();
    let len = buffer.len();
    let owner = Bound::new(
        py,
        OutputBuffer {
            storage: wrap(buffer),
        },
    )?
    .into_any();
    let mut arrays = Vec::with_capacity(rows.len());
    let mut offset = 0usize;
    for &n in rows {
        let cells = n * topk;
        if offset + cells > len {
            return Err(KernelError::internal("output buffer is smaller than its views").into());
        }
        // SAFETY: `offset + cells <= len` elements starting at `base` belong to the buffer now owned
        // by `owner`, which never moves or frees them before it is dropped; `owner` becomes the base
        // object of the array, so it outlives the view. The memory was written by the kernel and
        // no Rust reference to it remains.
        let array = unsafe {
            let view = ArrayView2::from_shape_ptr((n, topk), base.add(offset));
            PyArray2::borrow_from_array(&view, owner.clone())
        };
        arrays.push(array);
        offset += cells;
    }
    Ok(arrays)
}

fn csr_to_python<'py>(py: Python<'py>, targets: CsrTargets) -> PyResult<Bound<'py, PyTuple>> {
    (
        PyArray1::from_vec(py, targets.crow),
        PyArray1::from_vec(py, targets.col),
        PyArray1::from_vec(py, targets.target_tokens),
        PyArray1::from_vec(py, targets.weights),
    )
        .into_pyobject(py)
}

fn stats_dict<'py>(py: Python<'py>, stats: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("completion_tokens", stats.completion_tokens)?;
    dict.set_item("distilled_positions", stats.distilled_positions)?;
    dict.set_item("skipped_positions", stats.skipped_positions)?;
    dict.set_item("missing_teacher_rows", stats.missing_teacher_rows)?;
    dict.set_item("vocab_emptied_positions", stats.vocab_emptied_positions)?;
    dict.set_item("vocab_filtered_ids", stats.vocab_filtered_ids)?;
    dict.set_item("truncated_positions", stats.truncated_positions)?;
    dict.set_item("entropy_sum", stats.entropy_sum)?;
    Ok(dict)
}

// ---------------------------------------------------------------------------------------------
// The batch, segment by segment

/// Runs of datums with dense (or no) teachers, built in one kernel call each on several threads,
/// and each list-view datum on its own, so the converted rows of only one datum exist at a time.
/// Segments go in batch order, so the first error is the lowest datum's.
fn segments(guards: &[DatumGuard<'_>]) -> Vec<Range<usize>> {
    let mut segments: Vec<Range<usize>> = Vec::new();
    for (index, guard) in guards.iter().enumerate() {
        match segments.last_mut() {
            Some(last)
                if !guard.is_list() && !guards.get(last.start).is_some_and(DatumGuard::is_list) =>
            {
                last.end = index + 1
            }
            _ => segments.push(index..index + 1),
        }
    }
    segments
}

/// The kernel's views of a segment's datums; a list-view datum's rows are converted first.
fn segment_inputs<'a>(
    guards: &'a [DatumGuard<'_>],
    segment: &Range<usize>,
    config: &Config,
    gathered: &'a mut GatheredRows,
) -> PyResult<Vec<DatumInput<'a>>> {
    let Some(segment_guards) = guards.get(segment.clone()) else {
        return Err(KernelError::internal("segment out of range").into());
    };
    if let Some(guard) = segment_guards.first() {
        if let TeacherGuard::List(list) = &guard.teacher {
            gather_list_rows(segment.start, guard, list, config, gathered)?;
        }
    }
    let gathered: &'a GatheredRows = gathered;
    let inputs = segment_guards
        .iter()
        .zip(segment.clone())
        .map(|(guard, index)| guard.view(index, gathered))
        .collect::<Result<_, _>>()?;
    Ok(inputs)
}

/// Builds the CSR parts of every datum: a `(crow, col, target_tokens, weights)` tuple each.
fn build_sparse<'py>(
    py: Python<'py>,
    guards: &[DatumGuard<'_>],
    config: &Config,
    threads: usize,
) -> PyResult<(Bound<'py, PyList>, Stats)> {
    let result = PyList::empty(py);
    let mut stats = Stats::default();
    let mut gathered = GatheredRows::default();
    for segment in segments(guards) {
        let inputs = segment_inputs(guards, &segment, config, &mut gathered)?;
        let (outputs, segment_stats) =
            py.detach(|| build_csr_batch(&inputs, segment.start, config, threads))?;
        stats.add(&segment_stats);
        for targets in outputs {
            result.append(csr_to_python(py, targets)?)?;
        }
    }
    Ok((result, stats))
}

/// Builds every datum's `(N, topk)` blocks into one zero-filled buffer per tensor kind, and
/// returns a `(target_tokens, weights)` pair of views per datum.
fn build_dense<'py>(
    py: Python<'py>,
    guards: &[DatumGuard<'_>],
    config: &Config,
    threads: usize,
) -> PyResult<(Bound<'py, PyList>, Stats)> {
    let rows: Vec<usize> = guards.iter().map(DatumGuard::rows).collect();
    let offsets = dense_block_offsets(&rows, config.topk)?;
    let cells = offsets.last().copied().unwrap_or(0);
    let (mut target_tokens, mut weights) = py.detach(|| {
        Ok::<_, KernelError>((
            ZeroedBuffer::<i64>::new(cells, "the batch's (N, topk) int64 target_tokens")?,
            ZeroedBuffer::<f32>::new(cells, "the batch's (N, topk) float32 weights")?,
        ))
    })?;
    let mut stats = Stats::default();
    let mut gathered = GatheredRows::default();
    for segment in segments(guards) {
        let inputs = segment_inputs(guards, &segment, config, &mut gathered)?;
        let block = match (offsets.get(segment.start), offsets.get(segment.end)) {
            (Some(&start), Some(&end)) => start..end,
            _ => return Err(KernelError::internal("segment past the output offsets").into()),
        };
        let (Some(tokens_block), Some(weights_block)) = (
            target_tokens.as_mut_slice().get_mut(block.clone()),
            weights.as_mut_slice().get_mut(block),
        ) else {
            return Err(KernelError::internal("output blocks out of range").into());
        };
        let segment_stats = py.detach(|| {
            build_dense_batch(
                &inputs,
                segment.start,
                config,
                tokens_block,
                weights_block,
                threads,
            )
        })?;
        stats.add(&segment_stats);
    }
    let result = PyList::empty(py);
    let token_arrays = views_into(
        py,
        target_tokens,
        OutputStorage::TargetTokens,
        &rows,
        config.topk,
    )?;
    let weight_arrays = views_into(py, weights, OutputStorage::Weights, &rows, config.topk)?;
    for (tokens, weights) in token_arrays.into_iter().zip(weight_arrays) {
        result.append((tokens, weights))?;
    }
    Ok((result, stats))
}

/// Builds the `(N, K)` targets of a batch.
///
/// `datums` holds one `(mask, completion_len, teacher_prompt_len, teacher)` tuple per datum:
/// `mask` a 1-D float32 array of length `N`; `teacher` is `None`, the list view (a `list` of rows,
/// each `None` or a list of `(token_id, logprob)` pairs) or a `(token_ids, logprobs)` tuple of 2-D
/// arrays (int32/int64 and float32/float64, any strides). Returns `(outputs, stats)`: per datum
/// `(target_tokens, weights)` of shape `(N, topk)` (views into one zero-filled buffer per kind),
/// or with `sparse=True` the CSR parts `(crow_indices, col_indices, target_token_values,
/// weight_values)`. `threads=0` picks the thread count automatically.
#[pyfunction]
#[pyo3(signature = (datums, *, topk, vocab_size, skip_first_n, weight_scale, sparse, threads=0))]
#[allow(clippy::too_many_arguments)]
fn build_topk_batch<'py>(
    py: Python<'py>,
    datums: &Bound<'py, PyList>,
    topk: i64,
    vocab_size: Option<i64>,
    skip_first_n: i64,
    weight_scale: f64,
    sparse: bool,
    threads: usize,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyDict>)> {
    let config = Config::new(topk, vocab_size, skip_first_n, weight_scale)?;
    let guards = datums
        .iter()
        .enumerate()
        .map(|(index, item)| extract_datum(index, &item))
        .collect::<PyResult<Vec<_>>>()?;
    let threads = thread_count(threads, guards.iter().map(DatumGuard::rows).sum());
    let (outputs, stats) = if sparse {
        build_sparse(py, &guards, &config, threads)?
    } else {
        build_dense(py, &guards, &config, threads)?
    };
    Ok((outputs, stats_dict(py, &stats)?))
}

#[pymodule]
fn _kernel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", KERNEL_VERSION)?;
    m.add("MAX_TOPK", MAX_TOPK)?;
    m.add("MAX_TOKEN_ID", MAX_TOKEN_ID)?;
    m.add("SENTINEL_LOGPROB", SENTINEL_LOGPROB)?;
    m.add_class::<OutputBuffer>()?;
    m.add_function(wrap_pyfunction!(build_topk_batch, m)?)?;
    Ok(())
}
