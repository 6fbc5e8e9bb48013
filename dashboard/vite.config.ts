import { defineConfig } from "vite";

// Served by `vivarium serve` at /dashboard/ (src/vivarium/api/dashboard.py).
export default defineConfig({
  base: "/dashboard/",
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 1024 },
});
