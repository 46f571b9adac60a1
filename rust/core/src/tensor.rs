//! A borrowed view of a caller-owned, contiguous tensor (torch, numpy or any DLPack producer),
//! with the checks every op runs on its arguments.

use crate::error::{Error, Result};

/// Element types the ops accept or produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    U8,
    I32,
    I64,
}

impl DType {
    /// Parses torch's dtype names (`str(t.dtype)` without the `torch.` prefix).
    pub fn parse(name: &str) -> Option<DType> {
        Some(match name {
            "float32" | "float" => DType::F32,
            "float64" | "double" => DType::F64,
            "bfloat16" => DType::BF16,
            "float16" | "half" => DType::F16,
            "uint8" => DType::U8,
            "int32" | "int" => DType::I32,
            "int64" | "long" => DType::I64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A tensor owned by the caller. `name` is the argument name used in errors.
///
/// SAFETY contract (upheld by the binding that builds it): `ptr` addresses live memory on
/// `device` that stays valid and is not resized for as long as the `TensorRef` is used, laid out
/// row-major as rows of the last dimension, each row's values adjacent, row `r` starting
/// `r * row_stride` elements after `ptr`. `row_stride` is the last dimension's size (1 for a 0-d
/// tensor) for a contiguous tensor ([`TensorRef::dense`]), and larger only where the binding was
/// told that the op reads rows at a stride (the GPU forms of `rms_norm`, `rms_norm_rope` and
/// `swiglu`); every other op takes dense tensors alone.
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub name: &'static str,
    pub ptr: usize,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub device: Device,
    pub row_stride: usize,
}

impl TensorRef {
    /// A contiguous tensor's reference.
    pub fn dense(name: &'static str, ptr: usize, shape: Vec<usize>, dtype: DType, device: Device) -> TensorRef {
        let row_stride = shape.last().copied().unwrap_or(1);
        TensorRef { name, ptr, shape, dtype, device, row_stride }
    }

    /// Whether the rows are adjacent (the tensor is contiguous).
    pub fn is_dense(&self) -> bool {
        self.row_stride == self.shape.last().copied().unwrap_or(1)
    }

    /// An error naming the tensor unless it is contiguous (`why`: the form that needs it).
    pub fn expect_dense(&self, why: &str) -> Result<()> {
        if self.is_dense() {
            return Ok(());
        }
        Err(Error::value(self.name, format!("must be contiguous {why} (call .contiguous())")))
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    pub fn expect_dtype(&self, allowed: &[DType]) -> Result<DType> {
        if allowed.contains(&self.dtype) {
            return Ok(self.dtype);
        }
        let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
        Err(Error::dtype(
            self.name,
            format!("expected dtype {}, got {}", names.join(" or "), self.dtype.name()),
        ))
    }

    /// Checks the shape against a pattern; `None` accepts any extent.
    pub fn expect_shape(&self, pattern: &[Option<usize>]) -> Result<()> {
        let ok = self.shape.len() == pattern.len()
            && self.shape.iter().zip(pattern).all(|(s, p)| p.is_none_or(|p| p == *s));
        if ok {
            return Ok(());
        }
        let want: Vec<String> =
            pattern.iter().map(|p| p.map_or("*".to_string(), |v| v.to_string())).collect();
        Err(Error::value(
            self.name,
            format!("expected shape [{}], got {:?}", want.join(", "), self.shape),
        ))
    }

    pub fn expect_device(&self, device: Device) -> Result<()> {
        if self.device == device {
            return Ok(());
        }
        Err(Error::value(self.name, format!("expected a tensor on {device}, got one on {}", self.device)))
    }

    fn check_host<T>(&self, dtypes: &[DType]) -> Result<()> {
        self.expect_device(Device::Cpu)?;
        debug_assert!(dtypes.iter().all(|d| d.size() == std::mem::size_of::<T>()));
        self.expect_dtype(dtypes)?;
        self.check_pointer(std::mem::align_of::<T>())
    }

    fn check_pointer(&self, align: usize) -> Result<()> {
        self.expect_dense("on the CPU")?;
        if self.ptr == 0 && self.numel() > 0 {
            return Err(Error::value(self.name, "null data pointer"));
        }
        if !self.ptr.is_multiple_of(align) {
            return Err(Error::value(self.name, "data pointer is not aligned to its element size"));
        }
        Ok(())
    }

    /// Borrows a host tensor as a slice of `T`, whose size must match one of `dtypes`.
    ///
    /// # Safety
    /// The struct's contract, and no live mutable borrow of the same memory.
    pub unsafe fn host<T>(&self, dtypes: &[DType]) -> Result<&[T]> {
        self.check_host::<T>(dtypes)?;
        if self.numel() == 0 {
            return Ok(&[]);
        }
        Ok(std::slice::from_raw_parts(self.ptr as *const T, self.numel()))
    }

    /// Borrows a host tensor's bytes, whatever its dtype.
    ///
    /// # Safety
    /// The struct's contract, and no live mutable borrow of the same memory.
    pub unsafe fn host_bytes(&self) -> Result<&[u8]> {
        self.expect_device(Device::Cpu)?;
        self.check_pointer(1)?;
        if self.numel() == 0 {
            return Ok(&[]);
        }
        Ok(std::slice::from_raw_parts(self.ptr as *const u8, self.numel() * self.dtype.size()))
    }

    /// Borrows a host tensor's bytes mutably, whatever its dtype.
    ///
    /// # Safety
    /// The struct's contract, and no other live borrow of the same memory.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn host_bytes_mut(&self) -> Result<&mut [u8]> {
        self.expect_device(Device::Cpu)?;
        self.check_pointer(1)?;
        if self.numel() == 0 {
            return Ok(&mut []);
        }
        Ok(std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.numel() * self.dtype.size()))
    }

    /// Borrows a host tensor mutably.
    ///
    /// # Safety
    /// The struct's contract, and no other live borrow of the same memory.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn host_mut<T>(&self, dtypes: &[DType]) -> Result<&mut [T]> {
        self.check_host::<T>(dtypes)?;
        if self.numel() == 0 {
            return Ok(&mut []);
        }
        Ok(std::slice::from_raw_parts_mut(self.ptr as *mut T, self.numel()))
    }
}

/// Checks that all tensors share one device and returns it.
pub fn same_device(tensors: &[&TensorRef]) -> Result<Device> {
    let first = tensors[0].device;
    for t in &tensors[1..] {
        if t.device != first {
            return Err(Error::value(
                t.name,
                format!("is on {} but {} is on {first}; all tensors must share a device", t.device, tensors[0].name),
            ));
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_at_a_stride_are_never_read_as_a_host_slice() {
        let v = [0f32; 12];
        let mut t = TensorRef::dense("x", v.as_ptr() as usize, vec![3, 2], DType::F32, Device::Cpu);
        assert!(t.is_dense() && t.row_stride == 2);
        // SAFETY: `v` holds 12 values, more than 3 rows of 2 reach at a stride of up to 5.
        assert_eq!(unsafe { t.host::<f32>(&[DType::F32]) }.unwrap().len(), 6);
        t.row_stride = 4;
        assert!(!t.is_dense());
        // SAFETY: as above.
        let err = unsafe { t.host::<f32>(&[DType::F32]) }.unwrap_err().to_string();
        assert!(err.contains("x") && err.contains("contiguous"), "{err}");
        assert!(TensorRef::dense("s", 0, vec![], DType::F32, Device::Cpu).is_dense());
    }
}
