// Resource charts from the metrics history (GET /sandboxes/{id}/metrics), with uPlot.

import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

import type { Metric } from "./api";
import { bytes } from "./ui";

export interface Series {
  title: string;
  unit: string;
  value: (m: Metric) => number;
  max?: (m: Metric) => number;
}

export const SERIES: Series[] = [
  { title: "CPU", unit: "%", value: (m) => m.cpuUsedPct },
  { title: "Memory", unit: "MiB", value: (m) => m.memUsed / 2 ** 20, max: (m) => m.memTotal / 2 ** 20 },
  { title: "Disk", unit: "MiB", value: (m) => m.diskUsed / 2 ** 20, max: (m) => m.diskTotal / 2 ** 20 },
];

export class Chart {
  private plot: uPlot | null = null;

  constructor(
    private readonly el: HTMLElement,
    private readonly series: Series,
  ) {}

  update(samples: Metric[]): void {
    const data: uPlot.AlignedData = [
      samples.map((m) => m.timestampUnix),
      samples.map((m) => this.series.value(m)),
      samples.map((m) => (this.series.max ? this.series.max(m) : null)),
    ];
    if (this.plot) {
      this.plot.setData(data);
      return;
    }
    const unit = this.series.unit;
    this.plot = new uPlot(
      {
        title: this.series.title,
        width: Math.max(280, this.el.clientWidth || 360),
        height: 180,
        series: [
          {},
          { label: `${this.series.title} (${unit})`, stroke: "#2f7de1", fill: "rgba(47,125,225,0.15)", width: 1.5 },
          { label: "limit", stroke: "#999", dash: [4, 4], show: Boolean(this.series.max) },
        ],
        axes: [{}, { values: (_u, ticks) => ticks.map((t) => (unit === "%" ? `${Math.round(t)} %` : bytes(t * 2 ** 20))), size: 80 }],
        scales: { y: { range: (_u, _min, max) => [0, unit === "%" ? 100 : Math.max(1, max * 1.1)] } },
      },
      data,
      this.el,
    );
  }

  destroy(): void {
    this.plot?.destroy();
    this.plot = null;
  }
}
