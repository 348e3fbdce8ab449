use pyo3::prelude::*;

#[pymodule]
fn _kernel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", crate::kernel::KERNEL_VERSION)?;
    Ok(())
}
