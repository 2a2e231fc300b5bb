//! The GEMV against the GEMM of `cpu::linear` on the linear layers' shapes, to place
//! `GEMM_MIN_TOKENS`: median time of each, alternated in one run, and GFLOP/s.
//!
//! usage: cargo run --release --example linear_shapes -- [IN,OUT ...] (default: the 33.5M model's)

use std::time::Instant;

use multilora_engine::cpu::linear::{linear_gemm, linear_gemv};

fn main() {
    let shapes: Vec<(usize, usize)> = {
        let args: Vec<(usize, usize)> = std::env::args()
            .skip(1)
            .filter_map(|a| {
                let (i, o) = a.split_once(',')?;
                Some((i.parse().ok()?, o.parse().ok()?))
            })
            .collect();
        if args.is_empty() {
            vec![(512, 512), (512, 1376), (1376, 512)]
        } else {
            args
        }
    };
    println!("in\tout\ttokens\tgemv_us\tgemm_us\tgemv_GF/s\tgemm_GF/s");
    for (in_f, out_f) in shapes {
        let w: Vec<f32> = (0..in_f * out_f).map(|i| (i % 13) as f32 * 0.01 - 0.06).collect();
        for t in [1, 4, 8, 16, 32, 64, 96, 128, 192, 264, 1056] {
            let x: Vec<f32> = (0..t * in_f).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
            let mut y = vec![0.0f32; t * out_f];
            let flops = 2.0 * (t * in_f * out_f) as f64;
            let reps = ((2e8 / flops) as usize).clamp(5, 2000);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let s = Instant::now();
                linear_gemv(&x, &w, None, t, in_f, out_f, &mut y);
                a.push(s.elapsed().as_secs_f64());
                let s = Instant::now();
                linear_gemm(&x, &w, None, t, in_f, out_f, &mut y);
                b.push(s.elapsed().as_secs_f64());
            }
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            let (ma, mb) = (a[reps / 2], b[reps / 2]);
            println!(
                "{in_f}\t{out_f}\t{t}\t{:.1}\t{:.1}\t{:.1}\t{:.1}",
                ma * 1e6,
                mb * 1e6,
                flops / ma / 1e9,
                flops / mb / 1e9
            );
        }
    }
}
