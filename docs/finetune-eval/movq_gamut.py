"""MoVQ reconstruction error by object colour (docs/finetune-eval/diagnostics.md): python docs/finetune-eval/movq_gamut.py"""
import torch, numpy as np
from diffusers import VQModel
from lambda_eclipse.miniworld.scenes import iter_scenes, render_scene
from lambda_eclipse.miniworld.vocab import COLOURS, BG_COLOURS
from lambda_eclipse.miniworld.draw import contrast_colour
torch.set_num_threads(2)
def mixes(c):
    c=np.array(c,float); d=contrast_colour(c); return [c*(1-w)+d*w for w in (0,0.25,0.5,0.75,1)]
refs=[]
for c in COLOURS.values(): refs+=mixes(c)
for c in BG_COLOURS.values():
    c=np.array(c,float)
    for s in np.linspace(0.6,1.3,8): refs.append(np.clip(c*s,0,255))
    refs.append(contrast_colour(c))
refs=np.array(refs)
m = VQModel.from_pretrained("models/miniworld/movq").eval()
sc = [s for s, _ in zip(iter_scenes(5, 32, "train"), range(60)) if len(s.objects) == 1][:10]
cands={"green":(35,165,55),"lime0":(0,255,30),"brown":(120,60,10),"olive":(128,128,0),"navy":(20,30,110),"maroon":(120,20,30),"sky":(100,180,240),"mint":(120,230,170),"lime":(15,255,0),"cyan":(0,220,255),"gold":(200,160,0),"magenta":(230,0,230),"white":(255,255,255),"salmon":(250,150,120),"darkgreen":(10,80,20),"violet":(200,120,255)}
for n,c in cands.items():
    md=np.sqrt(((np.array(mixes(c))[:,None]-refs[None])**2).sum(-1)).min(); d0=np.sqrt(((np.array(c,float)-refs)**2).sum(-1)).min()
    scs=[render_scene(s.seed,32,"train",recolour={0:tuple(float(v) for v in c)}) for s in sc]
    x = torch.tensor(np.stack([q.image for q in scs])).permute(0,3,1,2).float()/127.5-1
    with torch.no_grad(): y = m.decode(m.encode(x).latents, force_not_quantize=True).sample
    y = ((y.clamp(-1,1)+1)*127.5).permute(0,2,3,1).numpy()
    errs=[]
    for q,img in zip(scs,y):
        mask=q.objects[0].box; x0,y0,x1,y1=mask
        errs.append(np.abs(img[y0:y1,x0:x1]-q.image[y0:y1,x0:x1]).mean())
    print(f"{n:10s} mindist {d0:5.1f} mixes {md:5.1f} recon err {np.mean(errs):5.1f}")
