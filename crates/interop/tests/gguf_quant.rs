//! Every ggml block type moelab dequantizes, against llama.cpp's gguf-py on the same random
//! blocks (tests/golden/quant, by reference/make_quant_golden.py). The quantized block
//! types decode through `kernels::quant` (what the quantized matmuls multiply), so this
//! also checks the kernels' block layouts, the K-quants' included.

use interop::gguf::quant;
use safetensors::SafeTensors;

#[test]
fn dequantization_matches_gguf_py() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/quant/blocks.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let types = [
        ("F16", quant::F16),
        ("BF16", quant::BF16),
        ("Q4_0", quant::Q4_0),
        ("Q4_1", quant::Q4_1),
        ("Q5_0", quant::Q5_0),
        ("Q8_0", quant::Q8_0),
        ("Q4_K", quant::Q4_K),
        ("Q6_K", quant::Q6_K),
    ];
    for (name, t) in types {
        let raw = st.tensor(&format!("{name}.bytes")).unwrap().data().to_vec();
        let want: Vec<f32> = st
            .tensor(&format!("{name}.values"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let got = quant::dequantize(t, &raw, want.len()).unwrap();
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // the same products in another order: a few ulps
            assert!(
                (g - w).abs() <= 1e-6 * scale,
                "{name}[{i}]: moelab {g}, gguf-py {w}"
            );
        }
    }
    // a count that is not whole blocks, or the wrong number of bytes, is an error
    assert!(quant::dequantize(quant::Q4_0, &[0; 18], 16).is_err());
    assert!(quant::dequantize(quant::Q4_0, &[0; 17], 32).is_err());
    let e = quant::byte_size(13, 256, "blk.0.attn_q.weight").unwrap_err();
    assert!(
        e.contains("Q5_K") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
}

#[test]
fn quantization_matches_gguf_py_byte_for_byte() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/quant/blocks.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (name, t) in [
        ("Q8_0", quant::Q8_0),
        ("Q4_0", quant::Q4_0),
        ("Q4_1", quant::Q4_1),
        ("Q5_0", quant::Q5_0),
    ] {
        let x: Vec<f32> = st
            .tensor(&format!("quantize.{name}.input"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want = st
            .tensor(&format!("quantize.{name}.bytes"))
            .unwrap()
            .data()
            .to_vec();
        let got = quant::quantize(t, &x).unwrap();
        assert_eq!(got, want, "{name}");
        // and dequantizes to within half a step of each block
        let back = quant::dequantize(t, &got, x.len()).unwrap();
        for (b, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let step = match name {
                "Q8_0" => amax / 127.0,
                "Q5_0" => 2.0 * amax / 31.0,
                _ => 2.0 * amax / 15.0,
            };
            for (a, c) in xs.iter().zip(ys) {
                assert!(
                    (a - c).abs() <= step * 0.51 + 1e-3 * amax,
                    "{name} block {b}: {a} -> {c}"
                );
            }
        }
    }
    assert!(quant::quantize(quant::Q4_K, &[0.0; 256]).is_err());
    assert!(quant::quantize(quant::Q8_0, &[0.0; 31]).is_err());
}
