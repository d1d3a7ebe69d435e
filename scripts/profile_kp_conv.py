"""kp_conv2d on a GPU at the spec's size, tf32: each kernel through its host function (Triton's
three, CUDA's three Hopper kernels; also at "tf32x3"), the op in eager mode and replayed in a
CUDA graph (the gap is the host's per-call cost), and, per backend choice and matmul precision,
the CUDA kernel times of a forward+backward step from torch.profiler (their sum is the step's GPU
time).

    python scripts/profile_kp_conv.py
"""
import torch, triton.testing as tt, protokernels as pk
from protokernels.triton_kernels import kp_conv as k
from torch.profiler import profile, ProfilerActivity
pk.available_backends()  # loads the CUDA extension (torch.ops.protokernels.*_cuda)
torch.set_float32_matmul_precision("high")
x = torch.randn(32, 64, 56, 56, device="cuda"); w = torch.randn(128, 64, 3, 3, device="cuda")
out = torch.empty(32, 128, 56, 56, device="cuda"); gx = torch.empty_like(x); gw = torch.empty_like(w)
g = [[1, 1], [1, 1], [1, 1]]
cuda_gw = torch.ops.protokernels.kp_conv2d_grad_weight_cuda
cuda_fwd = torch.ops.protokernels.kp_conv2d_cuda
cuda_gx = torch.ops.protokernels.kp_conv2d_grad_input_cuda
for name, fn in [("fwd host fn", lambda: k.kp_conv2d(x, w, *g, "tf32", out)),
                 ("fwd cuda (Hopper)", lambda: cuda_fwd(x, w, *g, "tf32", out)),
                 ("gx host fn", lambda: k.kp_conv2d_grad_input(out, x, w, *g, "tf32", gx)),
                 ("gx cuda (Hopper)", lambda: cuda_gx(out, x, w, *g, "tf32", gx)),
                 ("gw host fn", lambda: k.kp_conv2d_grad_weight(out, x, w, *g, "tf32", gw)),
                 ("gw cuda (Hopper)", lambda: cuda_gw(out, x, w, *g, "tf32", gw)),
                 ("op fwd", lambda: pk.kp_conv2d(x, w, padding=1))]:
    print(name, tt.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
# "highest" (split TF32 products): the three computations, CUDA's Hopper kernels against Triton's.
for name, cuda_fn, triton_fn in [
        ("fwd", lambda: cuda_fwd(x, w, *g, "tf32x3", out),
         lambda: k.kp_conv2d(x, w, *g, "tf32x3", out)),
        ("gx", lambda: cuda_gx(out, x, w, *g, "tf32x3", gx),
         lambda: k.kp_conv2d_grad_input(out, x, w, *g, "tf32x3", gx)),
        ("gw", lambda: cuda_gw(out, x, w, *g, "tf32x3", gw),
         lambda: k.kp_conv2d_grad_weight(out, x, w, *g, "tf32x3", gw))]:
    print(f"{name} tf32x3: cuda (Hopper) {tt.do_bench(cuda_fn):.4f} ms, "
          f"triton {tt.do_bench(triton_fn):.4f} ms")
xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
grad = torch.randn_like(out)
def step():
    pk.kp_conv2d(xr, wr, padding=1).backward(grad)
print("op fwd+bwd", tt.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=[xr, wr]))
graph = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3): pk.kp_conv2d(x, w, padding=1)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(graph):
    pk.kp_conv2d(x, w, padding=1)
print("op fwd in a CUDA graph", tt.do_bench(graph.replay, quantiles=[0.5, 0.2, 0.8]))
for backend, matmul in (("auto", "high"), ("triton", "high"), ("auto", "highest"),
                        ("triton", "highest")):
    torch.set_float32_matmul_precision(matmul)
    with pk.use_backend(backend):
        for _ in range(3): step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10): step()
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 10 / 1000
    print(f"{backend}, {matmul}: fwd+bwd GPU time of all kernels per step {total:.3f} ms")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]:
        per_call = e.self_device_time_total / e.count / 1000
        print(f"   {per_call:.4f} ms x{e.count // 10}  {e.key[:90]}")
torch.set_float32_matmul_precision("high")
# The three kernels at in-model sizes (3x3, padding 1): CUDA's Hopper kernels (with their w
# reorder and split sum) against Triton's, through their host functions.
for b, c, h, size, p in [(64, 1, 28, 28, 32), (32, 64, 14, 14, 64), (64, 1, 8, 8, 16),
                         (8, 128, 32, 32, 256), (16, 256, 28, 28, 512)]:
    xs, ws = torch.randn(b, c, h, size, device="cuda"), torch.randn(p, c, 3, 3, device="cuda")
    gs, gws = torch.randn(b, p, h, size, device="cuda"), torch.empty_like(ws)
    outs = torch.empty_like(gs)
    times = [tt.do_bench(lambda: fn(gs, xs, ws, *g, "tf32", gws))
             for fn in (cuda_gw, k.kp_conv2d_grad_weight)]
    times += [tt.do_bench(lambda: fn(xs, ws, *g, "tf32", outs)) for fn in (cuda_fwd, k.kp_conv2d)]
    gxs = torch.empty_like(xs)
    times += [tt.do_bench(lambda: fn(gs, xs, ws, *g, "tf32", gxs))
              for fn in (cuda_gx, k.kp_conv2d_grad_input)]
    print(f"B{b} C{c} {h}x{size} P{p}: gw cuda {times[0]:.4f} ms, triton {times[1]:.4f} ms; "
          f"fwd cuda {times[2]:.4f} ms, triton {times[3]:.4f} ms; "
          f"gx cuda {times[4]:.4f} ms, triton {times[5]:.4f} ms")
