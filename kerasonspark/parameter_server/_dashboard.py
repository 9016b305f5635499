"""The live stats page the parameter server serves at ``/v1/dashboard``.

One self-contained HTML page (no external scripts or fonts: clusters are often offline) that
reads ``/v1/stats`` with the same read-only token every second and draws it.
"""

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kerasonspark: live training</title>
<style>
 body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 4px} .sub{color:#666;margin-bottom:16px}
 .cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:16px}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:120px}
 .card b{display:block;font-size:20px}
 table{border-collapse:collapse;background:#fff;margin-bottom:16px}
 th,td{border:1px solid #ddd;padding:4px 10px;text-align:right} th{background:#f0f0f0}
 svg{background:#fff;border:1px solid #ddd;border-radius:6px}
 .err{color:#b00020}
</style></head><body>
<h1>kerasonspark: live training</h1><div class="sub" id="sub">connecting...</div>
<div class="cards" id="cards"></div>
<h2>Loss over time, per worker</h2><svg id="plot" width="720" height="260"></svg>
<h2>Workers</h2><table id="workers"></table>
<h2>Epochs</h2><table id="epochs"></table>
<script>
const colors=["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#7f7f7f"];
const fmt=(v,d=4)=>typeof v==="number"?(Math.abs(v)>=1000?v.toFixed(0):v.toFixed(d)):(v??"");
function table(el,head,rows){el.innerHTML="<tr>"+head.map(h=>"<th>"+h+"</th>").join("")+"</tr>"+
 rows.map(r=>"<tr>"+r.map(c=>"<td>"+c+"</td>").join("")+"</tr>").join("");}
function plot(workers){const svg=document.getElementById("plot"),W=720,H=260,P=56;let pts=[];
 for(const w in workers)for(const p of workers[w].loss_over_time)pts.push(p);
 if(!pts.length){svg.innerHTML="";return;}
 const t0=Math.min(...pts.map(p=>p[0])),t1=Math.max(...pts.map(p=>p[0]),t0+1);
 const l0=Math.min(...pts.map(p=>p[2])),l1=Math.max(...pts.map(p=>p[2]),l0+1e-6);
 const x=t=>P+(W-2*P)*(t-t0)/(t1-t0),y=l=>H-P+(-(H-2*P))*(l-l0)/(l1-l0);
 let s=`<line x1="${P}" y1="${H-P}" x2="${W-P}" y2="${H-P}" stroke="#999"/><line x1="${P}" y1="${P}" x2="${P}" y2="${H-P}" stroke="#999"/>`+
  `<text x="${W/2}" y="${H-8}" text-anchor="middle">seconds</text><text x="4" y="${P-8}">loss</text>`+
  `<text x="${P-4}" y="${y(l1)+4}" text-anchor="end">${fmt(l1,3)}</text><text x="${P-4}" y="${y(l0)+4}" text-anchor="end">${fmt(l0,3)}</text>`+
  `<text x="${W-P}" y="${H-P+16}" text-anchor="end">${fmt(t1,0)}</text>`;
 let i=0;for(const w in workers){const line=workers[w].loss_over_time.map(p=>x(p[0]).toFixed(1)+","+y(p[2]).toFixed(1)).join(" ");
  s+=`<polyline fill="none" stroke="${colors[i%8]}" stroke-width="2" points="${line}"/>`+
   `<text x="${W-P+4}" y="${P+16*i}" fill="${colors[i%8]}">w${w}</text>`;i++;}
 svg.innerHTML=s;}
async function tick(){try{const r=await fetch("stats"+location.search,{cache:"no-store"});
 if(!r.ok)throw new Error("HTTP "+r.status);const s=await r.json(),live=s.live||{workers:{},epochs:[]};
 document.getElementById("sub").textContent=`${Object.keys(live.workers).length} workers - `+
  `${fmt(s.elapsed_s,0)} s - updated ${new Date().toLocaleTimeString()}`+(live.failed?" - FAILED: "+live.failed:"");
 const cards=(s.rounds?[["rounds",s.rounds]]:[["pushes",s.updates],["staleness (median)",s.staleness.median]]).concat(
  [["MB/s through the server",fmt(s.mb_per_s,1)],["refused requests",s.refused_total]]);
 document.getElementById("cards").innerHTML=cards.map(c=>`<div class="card">${c[0]}<b>${c[1]}</b></div>`).join("");
 const names=[...new Set(Object.values(live.workers).flatMap(w=>Object.keys(w.metrics)))];
 table(document.getElementById("workers"),["worker","epoch","samples this epoch","samples/s","pushes",...names],
  Object.entries(live.workers).map(([w,v])=>[w,v.epoch+1,v.samples,fmt(v.samples_per_second,0),
   (s.worker_pushes||{})[w]??0,...names.map(n=>fmt(v.metrics[n]))]));
 const keys=["epoch",...[...new Set(live.epochs.flatMap(e=>Object.keys(e)))].filter(k=>k!=="epoch").sort()];
 table(document.getElementById("epochs"),keys,live.epochs.map(e=>keys.map(k=>k==="epoch"?e[k]:fmt(e[k]))));
 plot(live.workers);}catch(e){document.getElementById("sub").innerHTML=`<span class="err">${e}</span>`;}}
tick();setInterval(tick,1000);
</script></body></html>
"""
