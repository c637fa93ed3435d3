// Deletes topics (missing ones are ignored). For scripts/bench-verify.sh's clean-up.
//
// java -cp "$KAFKA_HOME/libs/*" DeleteTopics.java BROKERS TOPIC...
import java.util.Arrays;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;

public class DeleteTopics {
  public static void main(String[] args) throws Exception {
    Properties p = new Properties();
    p.put("bootstrap.servers", args[0]);
    try (Admin admin = Admin.create(p)) {
      var existing = admin.listTopics().names().get();
      var topics = Arrays.stream(args).skip(1).filter(existing::contains).toList();
      admin.deleteTopics(topics).all().get();
      System.out.println("deleted " + topics);
    }
  }
}
