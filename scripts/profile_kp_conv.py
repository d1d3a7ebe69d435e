"""kp_conv2d on a GPU at the spec's size, tf32: each Triton kernel through its host function, the
op in eager mode and replayed in a CUDA graph (the gap is the host's per-call cost), and the CUDA
kernel times of a forward+backward step from torch.profiler.

    python scripts/profile_kp_conv.py
"""
import torch, triton.testing as tt, protokernels as pk
from protokernels.triton_kernels import kp_conv as k
from torch.profiler import profile, ProfilerActivity
torch.set_float32_matmul_precision("high")
x = torch.randn(32, 64, 56, 56, device="cuda"); w = torch.randn(128, 64, 3, 3, device="cuda")
out = torch.empty(32, 128, 56, 56, device="cuda"); gx = torch.empty_like(x); gw = torch.empty_like(w)
g = [[1, 1], [1, 1], [1, 1]]
for name, fn in [("fwd host fn", lambda: k.kp_conv2d(x, w, *g, "tf32", out)),
                 ("gx host fn", lambda: k.kp_conv2d_grad_input(out, x, w, *g, "tf32", gx)),
                 ("gw host fn", lambda: k.kp_conv2d_grad_weight(out, x, w, *g, "tf32", gw)),
                 ("op fwd", lambda: pk.kp_conv2d(x, w, padding=1))]:
    print(name, tt.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
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
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10): step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
