// Java cells for the code interpreter's Java kernel (java_kernel.py): JShell, in this JVM.
//
// Frames, both ways, so that nothing needs escaping: a header line, then that many bytes.
// - In: "<n>\n" and a cell's code (UTF-8).
// - Out: "<kind> <n>\n" and the payload; kinds: ready, stdout, stderr (as the cell prints),
//   value (an expression's, as JShell shows it), error (name NUL value NUL traceback), done.
// The cell's System.out and System.err are ours; SIGINT stops the running cell, not the JVM.

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;

public class JShellRunner {
    private static final OutputStream PROTOCOL = new FileOutputStream(FileDescriptor.out);

    static synchronized void send(String kind, byte[] payload) {
        try {
            PROTOCOL.write((kind + " " + payload.length + "\n").getBytes(StandardCharsets.UTF_8));
            PROTOCOL.write(payload);
            PROTOCOL.flush();
        } catch (IOException e) {
            System.exit(1);  // the kernel is gone
        }
    }

    static void send(String kind, String text) {
        send(kind, text.getBytes(StandardCharsets.UTF_8));
    }

    /** What the cell prints, sent on as it comes (a line, or whatever one write holds). */
    static final class Stream extends OutputStream {
        private final String kind;
        private final ByteArrayOutputStream buffer = new ByteArrayOutputStream();

        Stream(String kind) {
            this.kind = kind;
        }

        @Override
        public synchronized void write(int b) {
            buffer.write(b);
            if (b == '\n') flush();
        }

        @Override
        public synchronized void write(byte[] bytes, int off, int len) {
            buffer.write(bytes, off, len);
            flush();
        }

        @Override
        public synchronized void flush() {
            if (buffer.size() > 0) {
                send(kind, buffer.toByteArray());
                buffer.reset();
            }
        }
    }

    public static void main(String[] args) throws IOException {
        PrintStream out = new PrintStream(new Stream("stdout"), true, StandardCharsets.UTF_8);
        PrintStream err = new PrintStream(new Stream("stderr"), true, StandardCharsets.UTF_8);
        System.setOut(out);
        System.setErr(err);
        JShell shell = JShell.builder().executionEngine("local").out(out).err(err).build();
        sun.misc.Signal.handle(new sun.misc.Signal("INT"), signal -> shell.stop());
        shell.eval("import java.util.*; import java.util.stream.*; import java.io.*;"
                + " import java.nio.file.*; import java.math.*;");
        DataInputStream in = new DataInputStream(new FileInputStream(FileDescriptor.in));
        System.setIn(new ByteArrayInputStream(new byte[0]));  // a cell never reads our frames
        send("ready", "");
        StringBuilder header = new StringBuilder();
        int c;
        while ((c = in.read()) != -1) {
            if (c != '\n') {
                header.append((char) c);
                continue;
            }
            byte[] code = new byte[Integer.parseInt(header.toString().trim())];
            header.setLength(0);
            in.readFully(code);
            run(shell, new String(code, StandardCharsets.UTF_8));
            out.flush();
            err.flush();
            send("done", "");
        }
    }

    static void run(JShell shell, String code) {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String remaining = code;
        String value = null;
        while (!remaining.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(remaining);
            if (info.completeness() == SourceCodeAnalysis.Completeness.DEFINITELY_INCOMPLETE
                    || info.source() == null) {
                error("CompilationException", "incomplete code: " + remaining.strip(),
                        List.of("incomplete code: " + remaining.strip()));
                return;
            }
            String source = info.source();
            remaining = info.remaining();
            for (SnippetEvent event : shell.eval(source)) {
                if (event.causeSnippet() != null) continue;
                if (event.status() == Snippet.Status.REJECTED) {
                    List<String> lines = new ArrayList<>();
                    shell.diagnostics(event.snippet()).forEach(d -> lines.add(d.getMessage(null)));
                    error("CompilationException", String.join("\n", lines), lines);
                    return;
                }
                if (event.exception() != null) {
                    thrown(event.exception());
                    return;
                }
                // An expression's value is shown (JShell keeps it as $1, $2, ...); what a
                // declaration or a statement leaves is not, as in a notebook.
                boolean expression = event.snippet().subKind().isExecutable()
                        && event.snippet().subKind() != Snippet.SubKind.VAR_DECLARATION_SUBKIND
                        && event.snippet().subKind()
                                != Snippet.SubKind.VAR_DECLARATION_WITH_INITIALIZER_SUBKIND
                        && event.snippet().subKind() != Snippet.SubKind.STATEMENT_SUBKIND;
                value = expression && event.value() != null && !event.value().isEmpty()
                        ? event.value() : null;
            }
        }
        if (value != null) send("value", value);
    }

    static void thrown(Exception exception) {
        String name = exception instanceof EvalException e
                ? e.getExceptionClassName() : exception.getClass().getName();
        List<String> trace = new ArrayList<>();
        trace.add(name + ": " + exception.getMessage());
        for (StackTraceElement element : exception.getStackTrace()) {
            trace.add("    at " + element);
        }
        error(name, String.valueOf(exception.getMessage()), trace);
    }

    static void error(String name, String value, List<String> traceback) {
        send("error", name + "\0" + value + "\0" + String.join("\n", traceback));
    }
}
