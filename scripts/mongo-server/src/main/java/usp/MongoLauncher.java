package usp;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Collection;
import java.util.List;

import de.bwaldvogel.mongo.MongoBackend;
import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.QueryResult;
import de.bwaldvogel.mongo.backend.memory.MemoryBackend;
import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.wire.message.MongoMessage;
import de.bwaldvogel.mongo.wire.message.MongoQuery;
import io.netty.channel.Channel;

/**
 * A private MongoDB test server: mongo-java-server with its in-memory backend on 127.0.0.1.
 *
 * <pre>
 *   java -cp ... usp.MongoLauncher PORT oplog|standalone
 * </pre>
 *
 * PORT 0 picks a free port. {@code oplog} enables the oplog (change streams work);
 * {@code standalone} leaves it off. Prints {@code READY <port>} once listening, then reads one
 * command a line from stdin and answers each with one line on stdout ({@code OK} or
 * {@code ERR <message>}):
 * <ul>
 * <li>{@code restart}: closes the listening socket and every client connection and forgets every
 * open cursor, then listens again on the same port with the same backend, so the data and the
 * oplog survive (as across a real server's restart);</li>
 * <li>{@code down}: closes the listening socket and every client connection, forgets every
 * open cursor;</li>
 * <li>{@code up}: listens again on the same port with the same backend;</li>
 * <li>{@code quit}, or the end of stdin: shuts down and exits 0.</li>
 * </ul>
 * Logs go to stderr.
 */
public final class MongoLauncher {

    /**
     * Reported by buildInfo (5.0.0) and isMaster (maxWireVersion 13, as MongoDB 5.0). The library's
     * own ServerVersion.MONGO_5_0 reports wire version 8 (MongoDB 4.2's), which the Rust driver
     * 3.9 refuses: it needs 9 (MongoDB 4.4) or more.
     */
    static final MongoVersion VERSION = new MongoVersion() {
        @Override
        public List<Integer> getVersionArray() {
            return List.of(5, 0, 0);
        }

        @Override
        public int getWireVersion() {
            return 13;
        }
    };

    private final Backend backend = new Backend();
    /** What each MongoServer gets: MongoServer.shutdown() closes (empties) its backend. */
    private final KeepOpenBackend served = new KeepOpenBackend(backend);
    private final int port;
    private MongoServer server;

    private MongoLauncher(int port, boolean oplog) {
        backend.version(VERSION);
        if (oplog) {
            backend.enableOplog();
        }
        server = new MongoServer(served);
        server.bind(new InetSocketAddress("127.0.0.1", port));
        this.port = server.getLocalAddress().getPort();
    }

    private void down() {
        if (server != null) {
            // Stops listening, closes every client connection, ends the event loops.
            server.shutdownNow();
            server = null;
            // A restarted server knows no cursors (getMore on an old id: CursorNotFound).
            backend.forgetCursors();
        }
    }

    private void up() {
        if (server == null) {
            MongoServer next = new MongoServer(served);
            next.bind(new InetSocketAddress("127.0.0.1", port));
            server = next;
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 2 || !(args[1].equals("oplog") || args[1].equals("standalone"))) {
            System.err.println("usage: java -cp ... usp.MongoLauncher PORT oplog|standalone");
            System.exit(2);
        }
        MongoLauncher launcher = new MongoLauncher(Integer.parseInt(args[0]), args[1].equals("oplog"));
        reply("READY " + launcher.port);

        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String command = line.trim();
            if (command.isEmpty()) {
                continue;
            }
            if (command.equals("quit")) {
                break;
            }
            try {
                switch (command) {
                    case "restart":
                        launcher.down();
                        launcher.up();
                        break;
                    case "down":
                        launcher.down();
                        break;
                    case "up":
                        launcher.up();
                        break;
                    default:
                        throw new IllegalArgumentException("unknown command: " + command);
                }
                reply("OK");
            } catch (RuntimeException e) {
                reply("ERR " + String.valueOf(e).replace('\n', ' '));
            }
        }
        launcher.down();
        launcher.backend.close();
        System.exit(0);
    }

    private static void reply(String line) {
        System.out.println(line);
        System.out.flush();
    }

    /** The in-memory backend, which can also drop every open cursor. */
    static final class Backend extends MemoryBackend {
        void forgetCursors() {
            CursorRegistry cursors = getCursorRegistry();
            // Ids are handed out in sequence from 1; this takes (and wastes) the next one.
            long last = cursors.generateCursorId();
            for (long id = 1; id <= last; id++) {
                cursors.remove(id);
            }
        }
    }

    /** Passes everything to the real backend except close(), which MongoServer calls on shutdown. */
    static final class KeepOpenBackend implements MongoBackend {
        private final MongoBackend inner;

        KeepOpenBackend(MongoBackend inner) {
            this.inner = inner;
        }

        @Override
        public void close() {
            // kept open: the next MongoServer on the same port serves the same data and oplog
        }

        @Override
        public void handleClose(Channel channel) {
            inner.handleClose(channel);
        }

        @Override
        public Document handleCommand(Channel channel, String database, String command, Document query) {
            return inner.handleCommand(channel, database, command, query);
        }

        @Override
        public QueryResult handleQuery(MongoQuery query) {
            return inner.handleQuery(query);
        }

        @Override
        public Document handleMessage(MongoMessage message) {
            return inner.handleMessage(message);
        }

        @Override
        public void dropDatabase(String database) {
            inner.dropDatabase(database);
        }

        @Override
        public Collection<Document> getCurrentOperations(MongoQuery query) {
            return inner.getCurrentOperations(query);
        }

        @Override
        public Document getServerStatus() {
            return inner.getServerStatus();
        }

        @Override
        public void closeCursors(List<Long> cursorIds) {
            inner.closeCursors(cursorIds);
        }

        @Override
        public java.time.Clock getClock() {
            return inner.getClock();
        }

        @Override
        public void enableOplog() {
            inner.enableOplog();
        }

        @Override
        public void disableOplog() {
            inner.disableOplog();
        }

        @Override
        public MongoDatabase resolveDatabase(String database) {
            return inner.resolveDatabase(database);
        }

        @Override
        public MongoBackend version(MongoVersion version) {
            inner.version(version);
            return this;
        }
    }
}
