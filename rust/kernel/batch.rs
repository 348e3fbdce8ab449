//! Many datums: their blocks of one shared output, the thread count, and the contiguous groups
//! of datums that worker threads build.

use super::config::Config;
use super::datum::{build_csr_datum_with, build_dense_datum_with, dense_cells, DatumInput, Stats};
use super::row::RowBuffer;
use super::sink::CsrTargets;
use super::KernelError;

/// Threads for a batch: `requested` when positive; otherwise one per core (at most 8) when the
/// batch is large enough to amortize starting them.
pub fn thread_count(requested: usize, total_rows: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    if total_rows < 4_096 {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Where each datum's `(N_i, topk)` block starts in a batch's dense output, plus the total:
/// `rows.len() + 1` offsets, in cells.
pub fn dense_block_offsets(rows: &[usize], topk: usize) -> Result<Vec<usize>, KernelError> {
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    let mut end = 0usize;
    offsets.push(end);
    for (index, &n) in rows.iter().enumerate() {
        end = n
            .checked_mul(topk)
            .and_then(|cells| cells.checked_add(end))
            .ok_or_else(|| KernelError::datum(index, "the (N, topk) output is too large"))?;
        offsets.push(end);
    }
    Ok(offsets)
}

/// Runs `work` item by item on up to `threads` threads, in contiguous groups balanced by `cost`.
/// Results come back in item order; the error of the lowest failing item wins, whatever thread
/// finished first, so the outcome never depends on scheduling.
fn run_in_groups<W, R, F>(
    work: Vec<W>,
    cost: &[usize],
    threads: usize,
    topk: usize,
    run: F,
) -> Result<Vec<R>, KernelError>
where
    W: Send,
    R: Send,
    F: Fn(usize, W, &mut RowBuffer) -> Result<R, KernelError> + Sync,
{
    let run_group = |first: usize, group: Vec<W>| -> Result<Vec<R>, KernelError> {
        let mut buffer = RowBuffer::new(topk);
        group
            .into_iter()
            .enumerate()
            .map(|(i, item)| run(first + i, item, &mut buffer))
            .collect()
    };
    let threads = threads.clamp(1, work.len().max(1));
    if threads == 1 {
        return run_group(0, work);
    }
    let total: usize = cost.iter().sum();
    let mut groups: Vec<(usize, Vec<W>)> = Vec::with_capacity(threads);
    let mut current = Vec::new();
    let (mut first, mut accumulated) = (0usize, 0usize);
    for (i, item) in work.into_iter().enumerate() {
        current.push(item);
        accumulated += cost.get(i).copied().unwrap_or(0);
        // Close the group once it holds its share of the total cost.
        if groups.len() + 1 < threads && accumulated * threads >= total * (groups.len() + 1) {
            groups.push((first, std::mem::take(&mut current)));
            first = i + 1;
        }
    }
    groups.push((first, current));

    let mut results: Vec<Result<Vec<R>, KernelError>> = Vec::with_capacity(groups.len());
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(groups.len());
        let mut groups = groups.into_iter();
        let head = groups.next();
        for (group_first, group) in groups {
            let run_group = &run_group;
            // A group whose thread cannot be started runs here, after the first one.
            let (sender, receiver) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new().spawn_scoped(scope, move || {
                let group = receiver.recv().unwrap_or_default();
                run_group(group_first, group)
            });
            match spawned {
                Ok(handle) => {
                    let _ = sender.send(group);
                    handles.push(Worker::Thread(handle));
                }
                Err(_) => handles.push(Worker::Inline(group_first, group)),
            }
        }
        if let Some((group_first, group)) = head {
            results.push(run_group(group_first, group));
        }
        for worker in handles {
            results.push(match worker {
                Worker::Thread(handle) => handle.join().unwrap_or_else(|_| {
                    Err(KernelError::internal("a kernel worker thread panicked"))
                }),
                Worker::Inline(group_first, group) => run_group(group_first, group),
            });
        }
    });
    let mut outputs = Vec::new();
    for result in results {
        outputs.extend(result?);
    }
    Ok(outputs)
}

enum Worker<'scope, W, R> {
    Thread(std::thread::ScopedJoinHandle<'scope, Result<Vec<R>, KernelError>>),
    Inline(usize, Vec<W>),
}

/// Builds every datum's dense targets into one pair of zero-filled buffers holding the datums'
/// `(N_i, topk)` blocks back to back (`sum N_i * topk` cells each), on up to `threads` threads.
/// `first_index` is the batch index of `inputs[0]` (for error messages).
pub fn build_dense_batch(
    inputs: &[DatumInput<'_>],
    first_index: usize,
    config: &Config,
    target_tokens: &mut [i64],
    weights: &mut [f32],
    threads: usize,
) -> Result<Stats, KernelError> {
    let cells = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| dense_cells(first_index + index, input, config.topk))
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = cells.iter().sum();
    if target_tokens.len() != total || weights.len() != total {
        return Err(KernelError::internal(format!(
            "output buffers hold {} and {} cells, expected {total}",
            target_tokens.len(),
            weights.len()
        )));
    }
    let mut work = Vec::with_capacity(inputs.len());
    let (mut tokens_rest, mut weights_rest) = (target_tokens, weights);
    for (input, &n) in inputs.iter().zip(&cells) {
        let (tokens_block, tokens_tail) = tokens_rest.split_at_mut(n);
        let (weights_block, weights_tail) = weights_rest.split_at_mut(n);
        work.push((input, tokens_block, weights_block));
        tokens_rest = tokens_tail;
        weights_rest = weights_tail;
    }
    let per_datum = run_in_groups(
        work,
        &cells,
        threads,
        config.topk,
        |index, (input, tokens, weights), buffer| {
            build_dense_datum_with(first_index + index, input, config, tokens, weights, buffer)
        },
    )?;
    let mut total_stats = Stats::default();
    for stats in &per_datum {
        total_stats.add(stats);
    }
    Ok(total_stats)
}

/// Builds every datum's targets in CSR form, on up to `threads` threads. `first_index` is the
/// batch index of `inputs[0]` (for error messages).
pub fn build_csr_batch(
    inputs: &[DatumInput<'_>],
    first_index: usize,
    config: &Config,
    threads: usize,
) -> Result<(Vec<CsrTargets>, Stats), KernelError> {
    let cost: Vec<usize> = inputs.iter().map(|input| input.mask.len()).collect();
    let per_datum = run_in_groups(
        inputs.iter().collect(),
        &cost,
        threads,
        config.topk,
        |index, input, buffer| build_csr_datum_with(first_index + index, input, config, buffer),
    )?;
    let mut total_stats = Stats::default();
    let mut outputs = Vec::with_capacity(per_datum.len());
    for (targets, stats) in per_datum {
        total_stats.add(&stats);
        outputs.push(targets);
    }
    Ok((outputs, total_stats))
}
