// Which node of the local three-node cluster holds a role, for fault injection (scripts/chaos.sh
// --cluster kills exactly the node that matters), and whether every replica is in sync.
// Compiled once and run by scripts/stack.sh (`cluster-role`, `cluster-wait-in-sync`) against the
// Kafka jars the stack installed; one Admin connection per call.
//
// Usage: ClusterRoles BOOTSTRAP COMMAND ARGS
//   leader TOPIC PARTITION            node id leading that partition
//   txn-coordinator TRANSACTIONAL_ID  node id coordinating that producer's transactions
//   group-coordinator GROUP           node id coordinating that consumer group
//   brokers                           ids of the registered brokers, one per line
//   out-of-sync                       every partition (internal ones too) with a replica out of
//                                     its ISR or no leader, one per line; nothing when all in sync
// Prints to stdout only the answer; exit 1 (message on stderr) when there is none.
import java.util.*;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.TopicPartitionInfo;

public class ClusterRoles {
    static final long TIMEOUT_S = 30;

    public static void main(String[] args) throws Exception {
        if (args.length < 2) usage();
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "10000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "25000");
        try (Admin admin = Admin.create(props)) {
            switch (args[1]) {
                case "leader" -> {
                    if (args.length != 4) usage();
                    String topic = args[2];
                    int partition = Integer.parseInt(args[3]);
                    TopicDescription d = admin.describeTopics(List.of(topic)).allTopicNames()
                        .get(TIMEOUT_S, TimeUnit.SECONDS).get(topic);
                    TopicPartitionInfo p = d.partitions().stream()
                        .filter(i -> i.partition() == partition).findFirst()
                        .orElseThrow(() -> fail(topic + " has no partition " + partition));
                    if (p.leader() == null || p.leader().isEmpty()) throw fail(topic + ":" + partition + " has no leader");
                    System.out.println(p.leader().id());
                }
                case "txn-coordinator" -> {
                    if (args.length != 3) usage();
                    TransactionDescription d = admin.describeTransactions(List.of(args[2]))
                        .description(args[2]).get(TIMEOUT_S, TimeUnit.SECONDS);
                    System.out.println(d.coordinatorId());
                }
                case "group-coordinator" -> {
                    if (args.length != 3) usage();
                    ConsumerGroupDescription d = admin.describeConsumerGroups(List.of(args[2]))
                        .describedGroups().get(args[2]).get(TIMEOUT_S, TimeUnit.SECONDS);
                    Node c = d.coordinator();
                    if (c == null || c.isEmpty()) throw fail("group " + args[2] + " has no coordinator");
                    System.out.println(c.id());
                }
                case "brokers" -> {
                    if (args.length != 2) usage();
                    for (Node n : admin.describeCluster().nodes().get(TIMEOUT_S, TimeUnit.SECONDS)) {
                        System.out.println(n.id());
                    }
                }
                case "out-of-sync" -> {
                    if (args.length != 2) usage();
                    Set<String> names = admin.listTopics(new ListTopicsOptions().listInternal(true))
                        .names().get(TIMEOUT_S, TimeUnit.SECONDS);
                    Map<String, TopicDescription> all = admin.describeTopics(names).allTopicNames()
                        .get(TIMEOUT_S, TimeUnit.SECONDS);
                    for (TopicDescription d : new TreeMap<>(all).values()) {
                        for (TopicPartitionInfo p : d.partitions()) {
                            boolean leaderless = p.leader() == null || p.leader().isEmpty();
                            if (leaderless || p.isr().size() < p.replicas().size()) {
                                System.out.printf("%s:%d replicas %s isr %s%n", d.name(), p.partition(),
                                    ids(p.replicas()), ids(p.isr()));
                            }
                        }
                    }
                }
                default -> usage();
            }
        } catch (java.util.concurrent.ExecutionException e) {
            System.err.println("ClusterRoles " + String.join(" ", args) + ": " + e.getCause());
            System.exit(1);
        } catch (java.util.concurrent.TimeoutException e) {
            System.err.println("ClusterRoles " + String.join(" ", args) + ": no answer within " + TIMEOUT_S + " s");
            System.exit(1);
        } catch (IllegalStateException e) {
            System.err.println("ClusterRoles " + String.join(" ", args) + ": " + e.getMessage());
            System.exit(1);
        }
    }

    static List<Integer> ids(List<Node> nodes) {
        return nodes.stream().map(Node::id).toList();
    }

    static IllegalStateException fail(String message) {
        return new IllegalStateException(message);
    }

    static void usage() {
        System.err.println("usage: ClusterRoles BOOTSTRAP leader TOPIC PARTITION | txn-coordinator TXN_ID"
            + " | group-coordinator GROUP | brokers | out-of-sync");
        System.exit(2);
    }
}
