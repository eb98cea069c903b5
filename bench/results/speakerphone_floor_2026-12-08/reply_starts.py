import pickle, numpy as np
d = pickle.load(open('/tmp/dump/sp-speakerphone-aec3.pkl','rb'))
print({k: (type(v).__name__, len(v) if hasattr(v,'__len__') else v) for k,v in d.items()})
t0=d['t0']; R=16000
def lvl(x, a, b):
    seg=x[int(a*R):int(b*R)].astype(np.float64)
    return 20*np.log10(np.sqrt(np.mean(seg**2))/32768+1e-9) if len(seg) else None
print('pauses (first 12):', [(round(p-t0,2), None if r is None else round(r-t0,2)) for p,r in d['pauses'][:12]])
for a in np.arange(73.8, 76.2, 0.1):
    print(f"{a:5.1f}  output {lvl(d['output'],a,a+0.1):6.1f}  caller {lvl(d['caller'],a,a+0.1):6.1f}  agent_in {lvl(d['agent_input'],a,a+0.1):6.1f}")
print("--- reply starts: level at the agent input 0.25-0.6 s after bot_started (the echo of her first words)")
starts=[t-t0 for t in d['times']['bot_started']]
rows=[]
for s in starts:
    out=lvl(d['output'], s, s+0.4); inn=lvl(d['agent_input'], s+0.25, s+0.6); cal=lvl(d['caller'], s+0.25, s+0.6)
    rows.append((round(s,1), round(out,1), round(inn,1), round(cal,1)))
leaks=[r for r in rows if r[2] > -45 and r[3] < -60]
print(len(rows), "starts;", len(leaks), "with the agent input above -45 dBFS while the caller was silent")
print(rows[:60])
