"""The DINO training step of ../shared/spec/baseline.md in PyTorch, for a baseline timed in the same run as dino-rs.

`cargo xtask bench --pytorch PYTHON` runs it after each step and forward case (PYTHON must have torch: `pip install
torch==2.15.0`, the version of baseline.md). It is the official facebookresearch/dino step re-typed from its
structure (vision_transformer.py, MultiCropWrapper, DINOHead, DINOLoss, utils.clip_gradients, the EMA loop of
main_dino.py; teacher and student forward and the loss under autocast as there): vit_tiny with drop path 0.1 and
DINOHead(192, K), AdamW in two groups, clip 3.0, EMA, epoch >= 1, random input crops. `--bf16` runs the autocast
region in bfloat16 on the CPU (`torch.autocast("cpu", torch.bfloat16)`), PyTorch's counterpart of dino-rs's
`--matmul-precision bf16`. `--forward` times the forward passes alone (teacher on the global crops, student on every
crop) under `torch.no_grad()`, as baseline.md's forward-only figures. `--device cuda` runs it on the GPU (bf16 autocast
there is `torch.autocast("cuda", torch.bfloat16)`, the official `--use_fp16` path in bf16), timed after a
`torch.cuda.synchronize()`. Prints one JSON line.
"""
import argparse, json, math, resource, statistics, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

def drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = keep + torch.rand(shape, dtype=x.dtype, device=x.device)
    mask.floor_()
    return x.div(keep) * mask

class Mlp(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.fc1 = nn.Linear(d, h); s.act = nn.GELU(); s.fc2 = nn.Linear(h, d)
    def forward(s, x): return s.fc2(s.act(s.fc1(x)))

class Attention(nn.Module):
    def __init__(s, d, heads):
        super().__init__(); s.h = heads; s.scale = (d // heads) ** -0.5
        s.qkv = nn.Linear(d, 3 * d, bias=True); s.proj = nn.Linear(d, d)
    def forward(s, x):
        B, N, C = x.shape
        qkv = s.qkv(x).reshape(B, N, 3, s.h, C // s.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * s.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return s.proj(x)

class Block(nn.Module):
    def __init__(s, d, heads, dp):
        super().__init__(); s.norm1 = nn.LayerNorm(d, eps=1e-6); s.attn = Attention(d, heads)
        s.norm2 = nn.LayerNorm(d, eps=1e-6); s.mlp = Mlp(d, 4 * d); s.dp = dp
    def forward(s, x):
        x = x + drop_path(s.attn(s.norm1(x)), s.dp, s.training)
        return x + drop_path(s.mlp(s.norm2(x)), s.dp, s.training)

class ViT(nn.Module):
    def __init__(s, img, patch, d=192, depth=12, heads=3, dpr=0.0):
        super().__init__()
        s.patch = patch; s.proj = nn.Conv2d(3, d, patch, patch)
        n = (img // patch) ** 2
        s.cls_token = nn.Parameter(torch.zeros(1, 1, d)); s.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        nn.init.trunc_normal_(s.pos_embed, std=.02); nn.init.trunc_normal_(s.cls_token, std=.02)
        rates = [x.item() for x in torch.linspace(0, dpr, depth)]
        s.blocks = nn.ModuleList([Block(d, heads, r) for r in rates]); s.norm = nn.LayerNorm(d, eps=1e-6)
        s.apply(s._init)
    def _init(s, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02); nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0); nn.init.constant_(m.weight, 1.0)
    def interpolate_pos_encoding(s, x, w, h):
        npatch = x.shape[1] - 1; N = s.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return s.pos_embed
        cls_pos = s.pos_embed[:, 0]; patch_pos = s.pos_embed[:, 1:]; dim = x.shape[-1]
        w0 = w // s.patch + 0.1; h0 = h // s.patch + 0.1
        patch_pos = F.interpolate(patch_pos.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
                                  scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode='bicubic')
        patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1)
    def forward(s, x):
        B, nc, w, h = x.shape
        x = s.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((s.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + s.interpolate_pos_encoding(x, w, h)
        for b in s.blocks:
            x = b(x)
        return s.norm(x)[:, 0]

class DINOHead(nn.Module):
    def __init__(s, d, out, hidden=2048, bottleneck=256):
        super().__init__()
        s.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        for m in s.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02); nn.init.constant_(m.bias, 0)
        s.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out, bias=False))
        s.last_layer.weight_g.data.fill_(1); s.last_layer.weight_g.requires_grad = False
    def forward(s, x):
        x = s.mlp(x); x = F.normalize(x, dim=-1, p=2); return s.last_layer(x)

class MultiCropWrapper(nn.Module):
    def __init__(s, backbone, head):
        super().__init__(); s.backbone = backbone; s.head = head
    def forward(s, x):
        idx_crops = torch.cumsum(torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start, output = 0, torch.empty(0, device=x[0].device)
        for end in idx_crops:
            _out = s.backbone(torch.cat(x[start:end]))
            output = torch.cat((output, _out)); start = end
        return s.head(output)

class DINOLoss(nn.Module):
    def __init__(s, out_dim, ncrops, student_temp=0.1, center_momentum=0.9):
        super().__init__(); s.student_temp = student_temp; s.center_momentum = center_momentum; s.ncrops = ncrops
        s.register_buffer("center", torch.zeros(1, out_dim))
    def forward(s, student_output, teacher_output, temp):
        student_out = (student_output / s.student_temp).chunk(s.ncrops)
        teacher_out = F.softmax((teacher_output - s.center) / temp, dim=-1).detach().chunk(2)
        total, n = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq: continue
                total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean(); n += 1
        total /= n
        s.update_center(teacher_output)
        return total
    @torch.no_grad()
    def update_center(s, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        s.center = s.center * s.center_momentum + batch_center * (1 - s.center_momentum)

def get_params_groups(model):
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad: continue
        (not_reg if name.endswith(".bias") or len(p.shape) == 1 else reg).append(p)
    return [{'params': reg}, {'params': not_reg, 'weight_decay': 0.}]

def clip_gradients(model, clip):
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1: p.grad.data.mul_(clip_coef)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--case', required=True, help='imagenet/65536, imagenet/4096, cifar/65536 or cifar/4096')
    ap.add_argument('--bf16', action='store_true')
    ap.add_argument('--forward', action='store_true', help='forward only, under no_grad: teacher on the 2 global crops, student on every crop')
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--device', default='cpu', help='cpu (2 threads) or cuda')
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == 'cpu':
        torch.set_num_threads(2)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    cfg, K = a.case.split('/'); K = int(K)
    if cfg == 'imagenet': img, patch, g, l, B = 224, 16, 224, 96, 8
    else: img, patch, g, l, B = 32, 4, 32, 16, 64
    student = MultiCropWrapper(ViT(img, patch, dpr=0.1), DINOHead(192, K)).to(dev)
    teacher = MultiCropWrapper(ViT(img, patch), DINOHead(192, K)).to(dev)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters(): p.requires_grad = False
    loss_fn = DINOLoss(K, 8).to(dev)
    opt = torch.optim.AdamW(get_params_groups(student))
    for i, pg in enumerate(opt.param_groups):
        pg['lr'] = 1e-4
        if i == 0: pg['weight_decay'] = 0.04
    crops = [torch.randn(B, 3, g, g, device=dev) for _ in range(2)] + [torch.randn(B, 3, l, l, device=dev) for _ in range(6)]
    times = []
    for it in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        if a.forward:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                teacher(crops[:2]); student(crops)
            sync()
            times.append(time.perf_counter() - t0)
            continue
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            teacher_output = teacher(crops[:2])
            student_output = student(crops)
            loss = loss_fn(student_output, teacher_output, 0.04)
        opt.zero_grad()
        loss.backward()
        clip_gradients(student, 3.0)
        opt.step()
        with torch.no_grad():
            m = 0.996
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.data.mul_(m).add_((1 - m) * ps.detach().data)
        sync()
        times.append(time.perf_counter() - t0)
        assert math.isfinite(loss.item())
    t = times[a.warmup:]
    med = statistics.median(t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({'case': ('forward/' if a.forward else 'step/') + a.case, 'impl': 'pytorch', 'precision': 'bf16' if a.bf16 else 'fp32',
                      'batch': B, 'iterations': a.steps,
                      'seconds_per_step_median': med, 'seconds_per_step_min': min(t), 'images_per_s': B / med,
                      'peak_rss_gib': rss, 'torch': torch.__version__, 'device': str(dev)}))

if __name__ == '__main__':
    main()
