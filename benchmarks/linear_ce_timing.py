"""Times fasteval.linear_cross_entropy (forward, forward + backward) and update_from_hidden at (8192, 256, 32000)
against F.linear + F.cross_entropy and torch's chunked F.linear_cross_entropy, float32 and bfloat16: medians of 3
calls on the same inputs, without the torch.compile rows of `python -m fasteval bench --only linear_cross_entropy`
(whose compilations take most of that table's time on a small CPU), and fasteval's forward with torch's matmul
for the vocabulary chunks (FASTEVAL_LCE_OWN_MATMUL=0) against its own kernels.

    python benchmarks/linear_ce_timing.py
"""
import os, torch, time, math, fasteval, torch.nn.functional as F
torch.manual_seed(0)
def tm(f, reps=3):
    f(); ts=[]
    for _ in range(reps):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    ts.sort(); return ts[len(ts)//2]
opts = torch.nn.LinearCrossEntropyOptions()
N,H,V = 8192,256,32000
for dt in (torch.float32, torch.bfloat16):
    x=torch.randn(N,H).to(dt); w=(torch.randn(V,H)/math.sqrt(H)).to(dt); t=torch.randint(0,V,(N,))
    xg=x.clone().requires_grad_(); wg=w.clone().requires_grad_()
    r = {}
    r["fe fwd"]=tm(lambda: fasteval.linear_cross_entropy(x,w,t))
    os.environ["FASTEVAL_LCE_OWN_MATMUL"]="0"  # the same with torch's matmul for the vocabulary chunks
    r["fe fwd, torch matmul"]=tm(lambda: fasteval.linear_cross_entropy(x,w,t))
    del os.environ["FASTEVAL_LCE_OWN_MATMUL"]
    r["eager fwd"]=tm(lambda: F.cross_entropy(F.linear(x,w),t))
    r["chunked fwd"]=tm(lambda: F.linear_cross_entropy(x,w,t,options=opts), reps=1)
    r["fe fwd+bwd"]=tm(lambda: torch.autograd.grad(fasteval.linear_cross_entropy(xg,wg,t),(xg,wg)))
    r["eager fwd+bwd"]=tm(lambda: torch.autograd.grad(F.cross_entropy(F.linear(xg,wg),t),(xg,wg)))
    print(dt, {k: f"{v*1e3:.0f} ms" for k,v in r.items()}, flush=True)
    print(f"  fwd: {r['eager fwd']/r['fe fwd']:.2f}x eager, {r['chunked fwd']/r['fe fwd']:.2f}x chunked, "
          f"{r['fe fwd, torch matmul']/r['fe fwd']:.2f}x with torch's matmul; "
          f"fwd+bwd: {r['eager fwd+bwd']/r['fe fwd+bwd']:.2f}x eager", flush=True)
    ev=fasteval.ClassificationEvaluator(V, top_k=(1,5), calibration_bins=15, full_confusion=False)
    u=tm(lambda: ev.update_from_hidden(x,w,t))
    print(f"  update_from_hidden {u*1e3:.0f} ms = {u/r['fe fwd']:.3f}x the loss-only forward", flush=True)
